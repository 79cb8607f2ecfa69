"""Write a random-weight model of the embedded SmolLM2-135M-Instruct's shape (config + tokenizer copied from the
dequantised cache) to argv[2]: trains and embeds at the same speed as the real weights."""
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, out = Path(sys.argv[1]), Path(sys.argv[2])
config = AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(out)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("random model", out, sum(p.numel() for p in model.parameters()), "params")
