"""Two CPU processes (gloo) under ``accelerate launch``: the callback's features and the builder's
experts and bundle are the same as in one process.

This file is also the worker: ``accelerate launch ... tests/test_distributed.py <dir>`` runs
``_worker`` on every process. accelerate 1.16's ``--cpu`` starts several CPU processes only
through mpirun; ``--multi_gpu`` (its torchrun launcher) with ``SFTConfig(use_cpu=True)`` gives a
gloo process group on CPUs.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

N_EXAMPLES = 18
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _worker(out: str) -> None:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from elrea_hf import ELREAGradientCallback
    from elrea_hf.builder import ELREABuilder
    from elrea_hf.clustering import GradientClusterer
    from elrea_hf.testing import tiny_prompt_completion_dataset, tiny_sft_config

    expert_runs = []
    real_train = SFTTrainer.train

    def recording_train(self, *a, **k):  # what each expert's trainer did, per process
        result = real_train(self, *a, **k)
        expert_runs.append({"processes": self.accelerator.num_processes, "steps": self.state.global_step,
                            "examples": len(self.train_dataset)})
        return result

    backbone = os.path.join(out, "backbone")
    tok = AutoTokenizer.from_pretrained(backbone)
    # 5-row parts: 4 parts dealt to 2 processes over 2 rounds.
    cb = ELREAGradientCallback(d_proj=64, features_part_size=5)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(backbone), args=tiny_sft_config(os.path.join(out, "run")),
                         train_dataset=tiny_prompt_completion_dataset(N_EXAMPLES), processing_class=tok,
                         peft_config=LoraConfig(**LORA), callbacks=[cb])
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()  # set up by the trainer
    trainer.train()
    base_steps = trainer.state.global_step
    SFTTrainer.train = recording_train
    builder = ELREABuilder.from_trainer(trainer, cb, expert_learning_rate=1e-3,
                                        clusterer=GradientClusterer(initial_clusters=3, min_cluster_size=2))
    builder.build(os.path.join(out, "bundle"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "base_steps": base_steps, "labels": builder.labels_.tolist(),
                   "sizes": builder.report_["sizes"], "experts": expert_runs, "callback_dir": cb.output_dir}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_features_and_bundle(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elrea_hf import ELREAForCausalLM
    from elrea_hf.feature_store import FeatureStore
    from elrea_hf.features import InstructionMasker, examples_from_prompts, instruction_gradient_features
    from elrea_hf.projection import ProjectionSpec
    from elrea_hf.testing import save_tiny_backbone, tiny_prompt_completion_dataset

    backbone = save_tiny_backbone(tmp_path / "backbone")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), __file__, str(tmp_path)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"2-process run took {time.time() - t0:.0f} s")
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in runs] == [2, 2]

    # (a) features: every example, in data-set order, equal to a one-process recomputation.
    cb_dir = runs[0]["callback_dir"]
    store = FeatureStore(os.path.join(cb_dir, "features"))
    assert len(store.parts) == 4
    assert store.example_index.tolist() == list(range(N_EXAMPLES))
    feats = store.features()
    from elrea_hf.features import EpochSnapshot

    snaps = [EpochSnapshot.load(os.path.join(cb_dir, "gradient_state", f"epoch_{e}.safetensors")) for e in (0, 1)]
    tok = AutoTokenizer.from_pretrained(backbone)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone), LoraConfig(**LORA))
    examples = examples_from_prompts(InstructionMasker(tok), tiny_prompt_completion_dataset(N_EXAMPLES)["prompt"])
    again = instruction_gradient_features(model, snaps, examples, ProjectionSpec.from_dict(store.meta["projection"]),
                                          pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(feats, again, rtol=1e-4, atol=1e-5)
    # Data parallel: 18 examples, batch 4 per process -> 3 steps per epoch, not 5.
    assert runs[0]["base_steps"] == 2 * 3

    # (b) the builder: same clusters on both processes, experts trained data-parallel, complete bundle.
    assert runs[0]["labels"] == runs[1]["labels"]
    sizes = runs[0]["sizes"]
    assert len(sizes) >= 2 and sum(sizes) == N_EXAMPLES
    for per_rank in (runs[0]["experts"], runs[1]["experts"]):
        assert [e["examples"] for e in per_rank] == sizes
        for e in per_rank:
            assert e["processes"] == 2 and e["steps"] == 2 * -(-e["examples"] // 8)
    bundle = tmp_path / "bundle"
    names = set(os.listdir(bundle))
    assert {"config.json", "routing.safetensors", "README.md", "gradient_state", "base"} <= names
    assert {f"expert_{c}" for c in range(len(sizes))} <= names
    assert not any(n.startswith(".partial") for n in os.listdir(tmp_path))
    loaded = ELREAForCausalLM.from_pretrained(bundle)
    assert loaded.route(["add 3 and 4"]).shape == (1, len(sizes) + 1)


if __name__ == "__main__":
    _worker(sys.argv[1])
    torch.distributed.barrier()
