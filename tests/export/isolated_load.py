"""Run in a child interpreter WITHOUT optimum-superweight: load an export with plain transformers.

Started as ``python -I -S isolated_load.py SITE_DIR... -- EXPORT IDS_FILE OUT_FILE``: ``-S`` skips site-packages'
``.pth`` files (so the editable install of optimum-superweight is never activated), the site directories are
appended by hand, and the script proves the package cannot be found before loading anything.
"""

import importlib.util
import sys

split = sys.argv.index("--")
sys.path.extend(sys.argv[1:split])
export_dir, ids_file, out_file = sys.argv[split + 1 : split + 4]
only = sys.argv[split + 4].split(",") if len(sys.argv) > split + 4 else None  # modules whose weights come back
assert importlib.util.find_spec("optimum_superweight") is None, "optimum_superweight is importable in the isolated child"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(export_dir)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
weights = {
    name: module.weight.detach().clone()
    for name, module in model.named_modules()
    if isinstance(module, torch.nn.Linear) and (only is None or name in only)
}
assert "optimum_superweight" not in sys.modules
torch.save({"logits": logits, "weights": weights, "dtype": str(logits.dtype)}, out_file)
print("loaded", type(model).__name__, tuple(logits.shape))
