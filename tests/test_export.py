"""`vidray export` on tiny real checkpoints: where it reads and writes, what the model card says, what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification

from vidray.cli import main
from vidray.errors import UserError
from vidray.infer.export import CUSTOM_CODE_FILE, export_model, model_card
from vidray.model.checkpoint import save_checkpoint
from vidray.model.classifier import load_trained_model

CLASSES = ["pour", "stir"]
DATA = {"frames": 4, "size": 32, "stored_frames": 8, "stored_size": 40, "classes": CLASSES}
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=DATA["size"],
            num_frames=DATA["frames"], patch_size=16, tubelet_size=2)  # fmt: skip


def _checkpoint(directory: Path, model) -> Path:
    info = {"epoch": 3, "metrics": {"val_accuracy": 0.5}, "data": DATA, "config": {"train": {"eval_clips": 1}}}
    return save_checkpoint(directory, model, training_state={"epoch": 3}, info=info)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = VideoMAEConfig(**TINY, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0003", VideoMAEForVideoClassification(config))


def _card(model: dict, held_out: dict | None = None, eval_clips: int = 1) -> str:
    info = {"data": DATA, "config": {"model": model, "train": {"eval_clips": eval_clips}}, "epoch": 3,
            "metrics": {}, "held_out": held_out}  # fmt: skip
    return model_card(info, None, (2, 2, 2))


def test_the_card_says_the_pipeline_needs_pyav(checkpoint, tmp_path):
    """transformers' VideoClassificationPipeline refuses to start without PyAV (requires_backends(self, "av"),
    decoding with torchcodec or not): a user who installed what the card listed got "requires the PyAv library"."""
    import inspect

    from transformers.pipelines.video_classification import VideoClassificationPipeline

    assert 'requires_backends(self, "av")' in inspect.getsource(VideoClassificationPipeline.__init__)
    card = (export_model(checkpoint, tmp_path / "model") / "README.md").read_text()
    assert "`torchcodec` (with FFmpeg's shared libraries) and `av` (PyAV" in card
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "with `torchvision`, `torchcodec` and `av` (PyAV" in readme


def test_base_model_is_only_a_hub_repo_id():
    """The Hub refuses a card whose base_model is no repo id: a `vidray pretrain` encoder on a bucket or a local
    path that is not there (another machine's) was written as one."""
    for path in ("s3://bucket/runs/demo-pretrain/encoder", "/abs/missing/encoder", "../runs/encoder"):
        card = _card({"init": "pretrained", "name_or_path": path})
        assert "base_model" not in card and f"Start: `{path}`" in card
    assert "\nbase_model: MCG-NJU/videomae-base\n" in _card({"init": "pretrained", "name_or_path": "MCG-NJU/videomae-base"})


def test_the_card_gives_the_held_out_views_and_the_predict_command_that_uses_them():
    """A sweep measures its held-out accuracy with tune.test_clips x tune.test_crops views; the card showed it as
    plain "held out" and said `vidray predict --model` (one centre crop, the training's eval clips) predicts so."""
    held_out = {"split": "test", "num_samples": 40, "accuracy": 0.75, "macro_f1": 0.7, "eval_clips": 5, "eval_crops": 3,
                "protocol": "5 clips x 3 crops (left, center, right)", "checkpoint": "/runs/t1/checkpoint_epoch_0003"}
    card = _card({}, held_out, eval_clips=2)
    assert "| test (held out, 5 clips x 3 crops (left, center, right) per video) | 40 | 0.750 | 0.700 |" in card
    assert ("`vidray predict --model PATH/TO/THIS/FOLDER --clips 5 --crops 3 video.mp4` predicts exactly as evaluation "
            "did (5 clips x 3 crops (left, center, right) per video).") in card  # fmt: skip
    # The default view (the training's eval clips, the centre crop): no options to give.
    single = {**held_out, "eval_clips": 2, "eval_crops": 1, "protocol": "2 clips x 1 crop (center)"}
    assert "`vidray predict --model PATH/TO/THIS/FOLDER video.mp4` predicts exactly as evaluation did." in _card({}, single, 2)
    # export_model keeps the views of the metrics it is given (evaluate's metrics.json).
    from vidray.infer.export import _card_metrics

    assert {"eval_clips": 5, "eval_crops": 3, "protocol": held_out["protocol"]}.items() <= _card_metrics(held_out).items()


PRETRAIN = VideoMAEConfig(**TINY, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                          decoder_intermediate_size=64, use_mean_pooling=False)  # fmt: skip


def test_a_pretrain_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """A `vidray pretrain` checkpoint's model/ is VideoMAEForPreTraining: export printed transformers' table of
    unexpected and missing weights, then called the checkpoint damaged."""
    pretrain = _checkpoint(tmp_path / "demo-pretrain" / "checkpoint_epoch_0000", VideoMAEForPreTraining(PRETRAIN))
    assert json.loads((pretrain / "model" / "config.json").read_text())["architectures"] == ["VideoMAEForPreTraining"]
    assert main(["export", "--checkpoint", str(pretrain), "--out", str(tmp_path / "model")]) == 2
    console = capsys.readouterr()
    assert console.err.splitlines() == [
        f"vidray export: error: {pretrain} is a `vidray pretrain` checkpoint: it has no classifier; fine-tune it first "
        "(`vidray train model.init=pretrained model.name_or_path=<run>/encoder`, the encoder `vidray pretrain` "
        "reported), then use that run's checkpoint"
    ]
    assert "damaged" not in console.err and "UNEXPECTED" not in console.out + console.err
    assert not (tmp_path / "model").exists()
    # `vidray predict --model` and `vidray evaluate` load it the same way; the run's encoder is named when it is there.
    VideoMAEForPreTraining(PRETRAIN).videomae.save_pretrained(tmp_path / "demo-pretrain" / "encoder")
    encoder = tmp_path / "demo-pretrain" / "encoder"
    with pytest.raises(UserError, match=rf"^{pretrain} is a `vidray pretrain` checkpoint: .+ model\.name_or_path={encoder}`"):
        load_trained_model(pretrain)


def test_export_to_a_uri_is_refused_in_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    """--out s3://bucket/x went through Path() as the local folder ./s3:/bucket/x: written there, exit 0."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", "s3://b/x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "vidray export: error: --out s3://b/x is a URI; vidray export writes a local folder: export to one, then "
        "upload it (e.g. `aws s3 cp --recursive DIR s3://b/x`)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_bucket_is_downloaded_and_exported(checkpoint, tmp_path, capsys):
    """`vidray train` on a bucket reports best_checkpoint as a URI, which export refused as not a directory. It is
    downloaded first now, as the sweep's report does (file:// goes through pyarrow's filesystems as s3:// does)."""
    uri = checkpoint.resolve().as_uri()
    assert uri.startswith("file:///")
    assert main(["export", "--checkpoint", uri, "--out", str(tmp_path / "model")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"exported": str(tmp_path / "model")}
    assert json.loads((tmp_path / "model" / "vidray.json").read_text())["exported_from"] == uri
    assert (tmp_path / "model" / "model.safetensors").is_file()
    missing = (tmp_path / "nope").as_uri()
    assert main(["export", "--checkpoint", missing, "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.startswith(f"vidray export: error: cannot download the checkpoint {missing} (")
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_on_a_bucket_is_named_by_its_uri_in_errors(checkpoint, tmp_path, capsys):
    """An export of a bucket's checkpoint that failed named the temporary folder it was downloaded to
    (/tmp/vidray-export-...), deleted by the time the user read it, and a pretrain checkpoint's hint pointed at an
    encoder beside that folder; they name the URI, and the encoder beside it, now."""
    pretrain = _checkpoint(tmp_path / "demo-pretrain" / "checkpoint_epoch_0009", VideoMAEForPreTraining(PRETRAIN))
    VideoMAEForPreTraining(PRETRAIN).videomae.save_pretrained(tmp_path / "demo-pretrain" / "encoder")
    uri, encoder = pretrain.as_uri(), (tmp_path / "demo-pretrain" / "encoder").as_uri()
    capsys.readouterr()  # saving's progress bars
    assert main(["export", "--checkpoint", uri, "--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vidray export: error: {uri} is a `vidray pretrain` checkpoint: it has no classifier; fine-tune it first "
        f"(`vidray train model.init=pretrained model.name_or_path={encoder}`, the encoder `vidray pretrain` "
        "reported), then use that run's checkpoint"
    ]
    # Any error about the checkpoint: here one whose weights are missing.
    incomplete = shutil.copytree(checkpoint, tmp_path / "incomplete" / "checkpoint_epoch_0003")
    (incomplete / "model" / "model.safetensors").unlink()
    assert main(["export", "--checkpoint", incomplete.as_uri(), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vidray export: error: {incomplete.as_uri()}/model holds no model.safetensors") and "vidray-" not in err
    assert not (tmp_path / "model").exists()


def test_re_exporting_into_a_clone_of_a_pushed_export_keeps_its_repository(checkpoint, tmp_path):
    """The folder of an earlier export was replaced whole: a Hub clone's .git and the user's files went with it."""
    out = export_model(checkpoint, tmp_path / "model")
    (out / ".git").mkdir()
    (out / ".git" / "config").write_text("[remote \"origin\"]\n")
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"the weights the clone had")
    (out / CUSTOM_CODE_FILE).write_text("# an earlier model's: this one has no resized position table")
    export_model(checkpoint, out)
    assert not (out / CUSTOM_CODE_FILE).exists()  # written for some models only: not the user's
    assert (out / ".git" / "config").read_text() == "[remote \"origin\"]\n" and (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() != b"the weights the clone had"
    assert json.loads((out / "vidray.json").read_text())["exported_from"] == str(checkpoint.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_leftover_holding_a_repository_is_never_deleted(checkpoint, tmp_path):
    """An export stopped while it moved the clone's .git into its new export: that folder is refused, not cleared."""
    out, partial = tmp_path / "model", tmp_path / "model.partial"
    export_model(checkpoint, partial)  # a whole export, as staged
    (partial / ".git").mkdir()
    with pytest.raises(UserError, match=rf"^{partial} holds a \.git: an export to {out} stopped while it moved"):
        export_model(checkpoint, out)
    assert (partial / ".git").is_dir() and not out.exists()
