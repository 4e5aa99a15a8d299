"""tinyllama-eval: lm-evaluation-harness on an HF export and straight on a run's checkpoint.

No internet here, so the check uses a small local multiple-choice task (lm-eval's task YAML over a
local jsonl): the accuracy lm-eval reports through our wrapper must equal the one recomputed from
log-likelihoods computed independently with transformers. The paper's suites are checked for what
they would run (tasks, shots, metrics) and for failing clearly without the Hub.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest
import torch

from megatron_tinyllama.checkpoint.convert import convert_from_hf, convert_to_hf
from megatron_tinyllama.config import config_from_dict, save_config
from megatron_tinyllama.evaluation import harness, paper_results
from megatron_tinyllama.evaluation.cli import main
from megatron_tinyllama.evaluation.harness import EvalError, resolve_model, run_evaluation
from megatron_tinyllama.evaluation.report import (EvalFileError, EvalReport, TaskResult,
                                                  format_table, load_report, save_report)
from megatron_tinyllama.evaluation.suites import SUITES, EvalTask, select_tasks
from tests.hf_helpers import save_hf_model, tricky_config

QUESTIONS = [
    ("The capital of France is", ["Paris", "a large banana", "x"]),
    ("Two plus two equals", ["four", "5", "a number that nobody knows"]),
    ("Water boils at", ["100 degrees", "dawn", "the end of the road, slowly"]),
    ("The opposite of up is", ["down", "sideways and backwards", "u"]),
    ("A cat says", ["meow", "hello there", "zz"]),
    ("The sky is", ["blue", "made of green cheese", "q"]),
    ("def add(a, b): return", ["a + b", "None", "print('a')"]),
    ("Monday comes before", ["Tuesday", "Sunday evening", "it"]),
    ("Ice is frozen", ["water", "fire and smoke", "w"]),
    ("The sun rises in the", ["east", "west side of town", "n"]),
    ("One, two,", ["three", "ten thousand", "o"]),
    ("Fish live in", ["water", "the desert during summer", "t"]),
]


def _task_dir(root):
    root.mkdir(parents=True, exist_ok=True)
    docs = [{"question": q, "choices": c, "answer": i % 3} for i, (q, c) in enumerate(QUESTIONS)]
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root, docs


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_spm):
    """A random tiny Llama as our model directory, a run save_dir holding it, and its HF export."""
    root = tmp_path_factory.mktemp("eval_models")
    cfg = tricky_config(vocab_size=512, seq_length=128)
    ours = convert_from_hf(save_hf_model(cfg, root / "hf_src", seed=3), root / "ours")
    hf = convert_to_hf(ours, root / "hf", tokenizer_model=llama_spm)
    run = root / "run"
    tag = run / "global_step000010"
    shutil.copytree(ours, tag / "model")
    (tag / "trainer_state.json").write_text(json.dumps(
        {"step": 10, "consumed_samples": 160, "consumed_tokens": 20480, "config": {"model": {}}}))
    (run / "latest").write_text("global_step000010")
    save_config(config_from_dict({"model": {"preset": "tinyllama-debug"},
                                  "data": {"tokenizer_model": str(llama_spm)}}), run / "config.yaml")
    tasks, docs = _task_dir(root / "tasks")
    return {"ours": ours, "hf": hf, "run": run, "tasks": tasks, "docs": docs}


def transformers_loglikelihoods(hf_dir, docs) -> list[list[float]]:
    """log P(" " + choice | question) per choice, summed over the choice's tokens, with BOS."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    for doc in docs:
        context_ids = tok(doc["question"]).input_ids
        assert context_ids[0] == tok.bos_token_id
        row = []
        for choice in doc["choices"]:
            whole = tok(doc["question"] + " " + choice).input_ids
            assert whole[: len(context_ids)] == context_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            row.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context_ids), len(whole))))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def hf_run(models):
    tasks = [EvalTask(name="tiny_acc", suite="local", lm_eval_task="tiny_mc", num_fewshot=0, metric="acc"),
             EvalTask(name="tiny_acc_norm", suite="local", lm_eval_task="tiny_mc", num_fewshot=0,
                      metric="acc_norm")]
    return run_evaluation(resolve_model(models["hf"]), tasks, device="cpu", batch_size=4,
                          include_path=models["tasks"], include_defaults=False, keep_raw=True)


def test_accuracy_equals_the_one_from_transformers_loglikelihoods(models, hf_run):
    report, raws = hf_run
    docs = models["docs"]
    lls = np.array(transformers_loglikelihoods(models["hf"], docs))
    answers = np.array([d["answer"] for d in docs])
    lengths = np.array([[len(c) for c in d["choices"]] for d in docs], dtype=float)
    acc = float(np.mean(lls.argmax(1) == answers))
    acc_norm = float(np.mean((lls / lengths).argmax(1) == answers))
    # The task separates the two metrics, so reading the wrong one would show.
    assert acc != acc_norm
    for scores in (lls, lls / lengths):  # no near-ties that float noise could flip
        top2 = np.sort(scores, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)
    assert report.values == {"tiny_acc": pytest.approx(acc), "tiny_acc_norm": pytest.approx(acc_norm)}
    samples = sorted(raws[0]["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    harness_lls = np.array([[resp[0][0] for resp in s["resps"]] for s in samples])
    np.testing.assert_allclose(harness_lls, lls, atol=1e-4)
    assert report.top1_error_tasks == ("tiny_acc", "tiny_acc_norm")
    assert report.average_top1_error == pytest.approx(1 - (acc + acc_norm) / 2)


def test_cli_on_a_run_checkpoint_converts_it_and_writes_the_json_into_the_run(
        models, hf_run, monkeypatch, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = main(["--model", str(models["run"]), "--include-path", str(models["tasks"]),
                 "--local-task", "tiny_mc:acc_norm", "--device", "cpu", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "global_step000010" in out and "20,480 tokens" in out
    report = load_report(models["run"] / "eval_results.json")
    # The same weights through the converter give the same number as the HF export.
    assert report.values == {"tiny_mc": hf_run[0].values["tiny_acc_norm"]}
    assert report.model["checkpoint_tag"] == "global_step000010" and report.model["tokens"] == 20480
    assert report.settings["limit"] is None
    assert report.settings["lm_eval_task_versions"] == {"tiny_mc": "Yaml"}
    assert list(scratch.iterdir()) == []  # the temporary HF conversion is gone


def test_checkpoint_without_tokenizer_is_named(models, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(models["ours"], bare)
    with pytest.raises(EvalError, match="no tokenizer for the checkpoint.*--tokenizer-model"):
        resolve_model(bare)
    with pytest.raises(EvalError, match="neither a Hugging Face directory"):
        resolve_model(tmp_path)


def test_hf_directory_without_tokenizer_files_is_named_before_loading_in_the_dry_run_too(
        models, tmp_path, monkeypatch, capsys):
    """Before: transformers' "You need to have sentencepiece or tiktoken installed" after the
    model loaded, and a dry run that said nothing."""
    import transformers

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(models["hf"] / name, bare / name)
    monkeypatch.setattr("megatron_tinyllama.evaluation.cli.run_evaluation",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    local = ["--local-task", "tiny_mc", "--include-path", str(models["tasks"])]
    for extra in (["--dry-run"], []):
        assert main(["--model", str(bare), *local, *extra]) == 2
        err = capsys.readouterr().err
        assert f"error: --model {bare}: no tokenizer files: neither tokenizer.json nor " \
               f"tokenizer.model (sentencepiece) is there (it holds: config.json, " \
               f"model.safetensors)" in err, err
    # Either file alone is enough for transformers, and for the check.
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copyfile(models["hf"] / name, bare / name)
        assert transformers.AutoTokenizer.from_pretrained(str(bare))("Water boils").input_ids
        assert main(["--model", str(bare), *local, "--dry-run"]) == 0
        (bare / name).unlink()


def test_paper_suites_run_the_papers_tasks_shots_and_metrics():
    shots = {t.name: t.num_fewshot for t in select_tasks(["all"])}
    # Paper §3: commonsense and Chinese 0-shot; MMLU 5-shot, BBH 3-shot, DROP 3-shot, HumanEval 0.
    assert shots == {"hellaswag": 0, "openbookqa": 0, "winogrande": 0, "arc_challenge": 0,
                     "arc_easy": 0, "boolq": 0, "piqa": 0, "mmlu": 5, "bbh": 3, "humaneval": 0,
                     "drop": 3, "xwinograd_zh": 0, "xstorycloze_zh": 0, "xnli_zh": 0, "xcopa_zh": 0}
    for suite, tasks in SUITES.items():
        for model in paper_results.MODELS:
            assert set(paper_results.RESULTS[suite][model]) == {t.name for t in tasks}


def test_paper_numbers_agree_with_the_papers_printed_averages():
    for suite, by_model in paper_results.RESULTS.items():
        for model, values in by_model.items():
            mean = sum(values.values()) / len(values)
            assert abs(mean - paper_results.AVERAGES[suite][model]) <= 0.02, (suite, model)
    assert paper_results.paper_value("commonsense", "hellaswag", "TinyLlama v1.1") == 61.47
    assert paper_results.paper_value("chinese", "xcopa_zh", "TinyLlama v1.1 Chinese") == 65.20


def test_dry_run_names_what_would_run(models, capsys):
    assert main(["--model", str(models["hf"]), "--dry-run", "--allow-code-execution"]) == 0
    out = capsys.readouterr().out
    for line in ("hellaswag        0-shot  acc_norm,none", "mmlu             5-shot  acc,none",
                 "bbh_fewshot      3-shot  exact_match,none", "drop             3-shot  em,none",
                 "humaneval        0-shot  pass@1,create_test", "xcopa_zh         0-shot  acc,none"):
        assert line in out


def test_offline_the_paper_suites_fail_clearly_before_loading_anything(models, monkeypatch,
                                                                       tmp_path, capsys):
    monkeypatch.setattr(harness, "hub_reachable", lambda timeout=5.0: False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "r.json"
    code = main(["--model", str(models["hf"]), "--suite", "commonsense", "chinese",
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "cannot reach the Hugging Face Hub" in err
    assert "hellaswag (0-shot)" in err and "xnli_zh (0-shot)" in err and "HF_DATASETS_OFFLINE=1" in err


def test_humaneval_needs_consent_to_run_generated_code(models, capsys):
    assert main(["--model", str(models["hf"]), "--task", "humaneval"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["--model", str(models["hf"]), "--dry-run"]) == 0  # the default run leaves it out
    out = capsys.readouterr().out
    assert "humaneval left out" in out and "humaneval        0-shot" not in out
    assert "drop             3-shot" in out


def test_a_dataset_that_cannot_be_loaded_is_reported_with_its_task(models, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode as HF_HUB_OFFLINE=1 sets it at import (no network retries in the test).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "gone.yaml").write_text(
        "task: gone_mc\ndataset_path: no-such-org/no-such-dataset-for-tinyllama-tests\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: c\ndoc_to_target: a\nmetric_list:\n  - metric: acc\n")
    task = EvalTask(name="gone_mc", suite="local", lm_eval_task="gone_mc", num_fewshot=0, metric="acc")
    with pytest.raises(EvalError, match="could not load the data of gone_mc"):
        run_evaluation(resolve_model(models["hf"]), [task], device="cpu", include_path=tmp_path,
                       include_defaults=False)


def test_table_prints_ours_beside_the_papers_and_the_json_round_trips(tmp_path):
    results = tuple(TaskResult(t, 0.5 + 0.01 * i) for i, t in enumerate(SUITES["commonsense"]))
    report = EvalReport(results, {"path": "m", "kind": "hf"}, "0.4.13", {"limit": None})
    table = format_table(report)
    hellaswag = next(line for line in table.splitlines() if line.startswith("hellaswag"))
    assert hellaswag.split()[3:] == ["50.00", "59.20", "61.47", "60.80", "58.23"]
    avg = next(line for line in table.splitlines() if line.startswith("Avg"))
    assert avg.split()[1:] == ["53.00", "52.99", "53.63", "53.75", "53.41"]
    back = load_report(save_report(report, tmp_path / "e.json"))
    assert back.values == report.values and back.top1_error_tasks == report.top1_error_tasks
    assert back.average_top1_error == pytest.approx(1 - 0.53)
    data = json.loads((tmp_path / "e.json").read_text())
    data["tasks"]["piqa"]["value"] = 56.0  # a percentage is not a fraction
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EvalFileError, match=r"bad.json: tasks.piqa.value = 56.0 is not a fraction"):
        load_report(tmp_path / "bad.json")
    del data["tasks"]["piqa"]["value"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(EvalFileError, match=r"tasks.piqa: missing field 'value'"):
        load_report(tmp_path / "bad.json")
