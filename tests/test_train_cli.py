"""``python -m transformer_kernels train | translate | evaluate`` end to end, as a user runs them."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys

from transformer_kernels.__main__ import main
from transformer_kernels.train import SyntheticTask

TINY = [
    "--synthetic-train",
    "160",
    "--vocab-size",
    "120",
    "--d-model",
    "32",
    "--dim-feedforward",
    "64",
    "--layers",
    "1",
    "--dropout",
    "0",
    "--batch-tokens",
    "160",
    "--warmup",
    "20",
    "--log-interval",
    "2",
    "--eval-interval",
    "4",
]


def cli(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "transformer_kernels", *args], capture_output=True, text=True, input=input
    )


def test_train_translate_evaluate(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    r = cli("train", "--out-dir", str(out), "--max-steps", "4", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step 2 epoch" in r.stdout and "tokens/s" in r.stdout and "validation loss" in r.stdout
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    assert (out / "log.csv").read_text().startswith("step,epoch,loss,lr,grad_norm,tokens_per_s")
    assert (out / "loss.png").stat().st_size > 0

    r = cli("translate", "--model", str(out), "--beam-size", "2", input="bi ka ro\nta ne\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    assert "100%" not in r.stderr, "no progress bar off a terminal"
    assert "translate: 2 sentences" in r.stderr and "sentences/s" in r.stderr and "tokens/s" in r.stderr
    cached = cli(
        "translate", "--model", str(out), "--beam-size", "2", "--decoding", "cached", input="bi ka ro\nta ne\n"
    )
    assert cached.returncode == 0 and cached.stdout == r.stdout, cached.stderr
    # on a terminal, translate shows a progress bar on stderr; stdout still holds only the translations
    monkeypatch.setattr(sys, "stdin", io.StringIO("bi ka ro\nta ne\n"))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["translate", "--model", str(out), "--beam-size", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2 and "translate: 100%" in captured.err
    monkeypatch.undo()

    r = cli("evaluate", "--model", str(out), "--synthetic-test", "4", "--beam-size", "1")
    assert r.returncode == 0, r.stderr
    assert "BLEU" in r.stdout and "signature: nrefs:1" in r.stdout and "loss" in r.stdout
    assert "decoding (static): 4 sentences" in r.stdout
    assert "100%" not in r.stderr

    # every Multi30k test split a user has, in the Multi30k layout (gzip or plain)
    data_dir = tmp_path / "multi30k"
    data_dir.mkdir()
    pairs = SyntheticTask(seed=1).pairs("test", 3)
    for split, suffix in (("test_2018_flickr", ".gz"), ("test_2017_mscoco", "")):
        for lang, lines in (("de", [s for s, _ in pairs]), ("en", [t for _, t in pairs])):
            with (gzip.open if suffix else open)(data_dir / f"{split}.{lang}{suffix}", "wt", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in lines)
        args = ["evaluate", "--model", str(out), "--data-dir", str(data_dir), "--split", split, "--beam-size", "1"]
        assert main(args) == 0
        assert f"{split}: 3 sentences" in capsys.readouterr().out

    # resume extends the same run, warning of a given flag the run fixes (not of those left out, whose
    # defaults differ from the run's too); a second run into the same directory is refused (in-process: faster)
    assert main(["train", "--out-dir", str(out), "--resume", "--max-steps", "6", "--dropout", "0.2"]) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout
    assert [line for line in stdout.splitlines() if "warning" in line] == [
        f"warning: --dropout 0.2 is ignored: {out} holds a run started with --dropout 0.0, which --resume continues "
        "unchanged"
    ]
    assert (out / "checkpoints" / "step_00000006").is_dir()
    assert main(["train", "--out-dir", str(out), "--max-steps", "2", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_input_is_a_clear_message(tmp_path, capsys):
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    (tmp_path / "a.en").write_text("one\n")
    assert (
        main(
            [
                "train",
                "--out-dir",
                str(tmp_path / "r"),
                "--train-src",
                str(tmp_path / "a.de"),
                "--train-tgt",
                str(tmp_path / "a.en"),
            ]
        )
        == 2
    )
    assert "misaligned" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing written"
    assert main(["train", "--out-dir", str(tmp_path / "r"), "--preset", "huge", *TINY]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["translate", "--model", str(tmp_path / "nothing")]) == 2
    assert "not a training output directory" in capsys.readouterr().err
