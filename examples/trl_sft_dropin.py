"""An ordinary TRL SFT script with ELREA added in two lines (marked # ELREA).

Runs on the default backbone (SmolLM2-135M-Instruct, offline) and the embedded skill mixture:
    .venv/bin/python examples/trl_sft_dropin.py --output-dir elrea-dropin
"""

import argparse

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from elrea_hf import ELREAGradientCallback, default_backbone
from elrea_hf.builder import ELREABuilder
from elrea_hf.data import skill_mixture

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", default="elrea-dropin")
parser.add_argument("--n", type=int, default=20, help="training examples per skill")
args = parser.parse_args()

model_id = default_backbone()
train = skill_mixture("train", n=args.n, seed=0)
config = SFTConfig(output_dir=f"{args.output_dir}/run", num_train_epochs=2, learning_rate=5e-4,
                   per_device_train_batch_size=8, use_cpu=True, bf16=False, gradient_checkpointing=False,
                   optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=10)
callback = ELREAGradientCallback()  # ELREA
trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_id), args=config, train_dataset=train,
                     processing_class=AutoTokenizer.from_pretrained(model_id),
                     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                     callbacks=[callback])
trainer.train()
ensemble = ELREABuilder.from_trainer(trainer, callback, expert_learning_rate=2e-4).build(  # ELREA
    f"{args.output_dir}/bundle", overwrite=True)
print(f"bundle with {len(ensemble.config.expert_names)} experts written to {args.output_dir}/bundle")
