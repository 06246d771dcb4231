"""export and cai revise over 2 processes × 2 devices (scripts/launch_local.sh, gloo) write the files one
process with 4 devices writes (that one run in this pytest process, on 4 of its 8 simulated devices); merge-adapters
on a mesh writes the one-device files.

One tiny LoRA run is trained once (one device) for the module; each 2-process launch costs ~30-60 s here, so
there are two: export merged, cai revise.
"""

import dataclasses
import json
import shutil

import pytest

from jaxft.commands import cai
from jaxft.commands.export import export
from jaxft.commands.merge_adapters import merge_adapters
from jaxft.commands.train import train
from jaxft.config import MeshConfig, load_config, read_config
from jaxft.data.task import make_examples
from tiny import ROOT, launch_local

FSDP4 = MeshConfig(fsdp=4)  # one process, 4 of the 8 devices conftest.py simulates


@pytest.fixture(scope="module")
def lora_run(chat_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_export")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_examples(8, seed=3)))
    o = {"model.path": chat_model, "data.train": d / "train.jsonl", "data.validation": "null", "data.max_length": 128,
         "train.batch_size": 4, "train.grad_accum": 1, "train.steps": 2, "train.eval_every": 0, "lora.r": 4,
         "lora.alpha": 8, "lora.dropout": 0, "optim.lr": 1e-2, "optim.warmup_steps": 0, "train.out_dir": d / "run"}
    train(load_config(ROOT / "configs" / "sft_lora.yaml", [f"{k}={v}" for k, v in o.items()]), progress=False)
    return d / "run"


def _files(path):
    """relative name → bytes of a file, or of every file under a folder."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _same_files(a, b):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [n for n in fa if fa[n] != fb[n]] == []


def _on(run_dir, mesh: MeshConfig):
    return dataclasses.replace(read_config(run_dir), mesh=mesh)


def test_export_over_two_processes_writes_the_one_process_files(lora_run, tmp_path):
    """merged (the adapters gathered, the base streamed out of its shards one layer at a time): the 2-process
    files equal one process × 4 devices' byte for byte, and those equal the one-device export's, as peft's and
    gguf's do (their feeding is a part of merged's: the adapters gathered; every layer gathered)."""
    r = launch_local(2, "export", lora_run, "--format", "merged", "--out", tmp_path / "multi", "--mesh", "fsdp=-1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("exported step 2") == 1  # process 0 alone reports
    for fmt, out in (("merged", "m"), ("peft", "p"), ("gguf", "g.gguf")):
        for name, mesh in (("single", FSDP4), ("one-device", MeshConfig())):
            export(_on(lora_run, mesh), fmt, tmp_path / name / out)
        _same_files(tmp_path / "single" / out, tmp_path / "one-device" / out)
    _same_files(tmp_path / "multi", tmp_path / "single" / "m")


def test_merge_adapters_on_a_mesh(lora_run, tmp_path):
    """An svd merge of the run (its model built on 4 devices, the adapter gathered as export's peft is over
    processes above) and a PEFT folder writes what the one-device merge writes."""
    peft = tmp_path / "peft"
    export(_on(lora_run, MeshConfig()), "peft", peft)
    for name, mesh in (("fsdp4", FSDP4), ("one-device", MeshConfig())):
        merge_adapters([lora_run, peft], [1.0, -0.5], "svd", tmp_path / name, svd_rank=4, mesh=mesh)
    _same_files(tmp_path / "fsdp4", tmp_path / "one-device")


def test_cai_revise_over_two_processes_resumes_to_the_same_files(chat_model, tmp_path):
    """cai revise, fsdp over 2 processes × 2 devices, resuming a folder where one process × 4 devices left chunk
    0 of 2 (process 0 reads it, tells the others to skip it): every file equals the uninterrupted run's."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ("Name a city.", "Say hi.", "Add 2 and 2.",
                                                                         "Why?")))
    o = [f"model.path={chat_model}", f"cai.prompts={prompts}", f"cai.constitution={ROOT / 'configs/constitutions/task.yaml'}",
         "cai.batch_size=2", "cai.max_new_tokens=6", "cai.few_shot=false", "cai.revisions=1", "cai.max_prompts=4"]
    config = ROOT / "configs" / "cai_task.yaml"
    single = load_config(config, [*o, f"cai.out_dir={tmp_path / 'single'}", "mesh.fsdp=4"])
    cai.revise(single)
    multi = tmp_path / "multi" / "revise"
    (multi / "chunks").mkdir(parents=True)
    for f in ("manifest.json", "chunks/00000.jsonl"):
        shutil.copy(tmp_path / "single" / "revise" / f, multi / f)
    r = launch_local(2, "cai", "revise", config, *o, f"cai.out_dir={tmp_path / 'multi'}", "--mesh", "fsdp=-1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"sft_rows"') == 1  # process 0 alone reports
    assert "chunk 1/2" not in r.stderr and r.stderr.count("chunk 2/2 done") == 1
    for f in ("manifest.json", "chunks/00000.jsonl", "chunks/00001.jsonl", "trace.jsonl", "sft.jsonl"):
        assert (multi / f).read_bytes() == (tmp_path / "single" / "revise" / f).read_bytes(), f
