"""Quantize the embedded SmolLM2 to 4 bit on load, save, reload with a plain from_pretrained, generate.

Run: python examples/quantize_save_reload.py [OUTPUT_DIR]
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_superweight  # registers the "superweight" quantization method with transformers
from optimum_superweight import SuperWeightConfig

source = optimum_superweight.default_model_path()  # or any local folder / Hub id of a causal LM
output = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-superweight-4bit"

tokenizer = AutoTokenizer.from_pretrained(source)
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=SuperWeightConfig(bits=4, group_size=64))
for sw in model.config.quantization_config.get_super_weights():
    print("kept exact:", sw.paper_notation(), sw.value)

model.save_pretrained(output)
tokenizer.save_pretrained(output)
reloaded = AutoModelForCausalLM.from_pretrained(output)  # config.json carries the method

messages = [{"role": "user", "content": "Name three primary colors."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = reloaded.generate(**inputs, max_new_tokens=30, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
