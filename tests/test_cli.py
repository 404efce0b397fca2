"""`specserve generate` and `specserve models tiny` as a user runs them."""

import json
import subprocess
import sys

import pytest

from specserve.cli import main


def gen(capsys, *args):
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_models_tiny_writes_three_models(tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path), "--seed", "1", "--layers", "1", "--vocab", "300"]) == 0
    out = capsys.readouterr().out
    for name in ("target", "draft-same", "draft-random"):
        assert (tmp_path / name / "config.json").exists() and name in out
    assert json.loads((tmp_path / "target" / "config.json").read_text())["vocab_size"] == 300


def test_generate_json_sd_equals_ar(tiny_dir, capsys):
    common = ["--target", str(tiny_dir / "target"), "--prompt", "def add(a, b):", "--max-new-tokens", "24",
              "--dtype", "float32", "--json", "--threads", "1"]
    rc, out, _ = gen(capsys, *common, "--mode", "ar")
    assert rc == 0
    ar = json.loads(out)
    rc, out, _ = gen(capsys, *common, "--draft", str(tiny_dir / "draft-same"), "--draft-quantize", "none", "--k", "4")
    assert rc == 0
    sd = json.loads(out)
    assert sd["token_ids"] == ar["token_ids"] and sd["text"] == ar["text"]
    assert sd["mode"] == "sd" and ar["mode"] == "ar"
    st = sd["stats"]
    assert {"new_tokens", "rounds", "draft_tokens", "accepted_tokens", "acceptance_rate", "elapsed_s",
            "tokens_per_s"} <= set(st)
    assert st["acceptance_rate"] == 1.0 and st["new_tokens"] == 24 and st["rounds"] < ar["stats"]["rounds"]


def test_generate_streams_text_and_reads_stdin(tiny_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time"))
    rc, out, err = gen(capsys, "--target", str(tiny_dir / "target"), "--draft", str(tiny_dir / "draft-random"),
                       "--prompt", "-", "--chat", "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "3")
    assert rc == 0 and out.endswith("\n") and "[sd] 8 tokens" in err


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k: the draft length must be >= 1"),
    (["--temperature", "-1"], "--temperature: temperature must be >= 0"),
    (["--top-p", "0"], "--top-p: top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: top_p must be in (0, 1]"),
    (["--prompt", "  "], "--prompt: the prompt is empty"),
    (["--mode", "sd", "--draft", ""], "--draft: mode sd needs a draft model"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--mode", "ssd", "--draft-address", "127.0.0.1:1", "--fanout-budget", "4"], "--fanout-budget is the local worker's"),
    (["--mode", "ssd", "--draft", "x", "--fanout-budget", "-1"], "--fanout-budget must be >= 0"),
])
def test_bad_flags_name_the_flag(tiny_dir, capsys, args, message):
    rc, _, err = gen(capsys, "--target", str(tiny_dir / "target"), "--prompt", "hi", *args)
    assert rc == 2 and message in err


def test_missing_model_directory_names_the_flag(tmp_path, tiny_dir, capsys):
    rc, _, err = gen(capsys, "--target", str(tmp_path / "missing"), "--prompt", "hi")
    assert rc == 2 and "--target:" in err and "missing" in err and "models prepare" in err
    rc, _, err = gen(capsys, "--target", str(tiny_dir / "target"), "--draft", str(tmp_path / "gone"), "--prompt", "hi")
    assert rc == 2 and "--draft:" in err and "gone" in err


def test_vocab_mismatch_names_both_sizes(tmp_path, tiny_dir, capsys):
    assert main(["models", "tiny", str(tmp_path), "--vocab", "300"]) == 0
    capsys.readouterr()
    rc, _, err = gen(capsys, "--target", str(tiny_dir / "target"), "--draft", str(tmp_path / "target"),
                     "--prompt", "hi")
    assert rc == 2 and "300 tokens" in err and "512 tokens" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "specserve", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout
