"""Child process of tests/models/test_saving.py: save SOURCE's model into TARGET, SIGKILLed at POINT.

POINT: ``mid-weights`` (a weight file half written), ``after-config`` (transformers wrote config.json),
``replace-N`` (before the N-th os.replace), or ``none``.
"""

import os
import signal
import sys

import optimum_superweight  # noqa: F401  registers the quantizer
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM, PretrainedConfig

source, target, point = sys.argv[1:4]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if point == "mid-weights":
    original_save_file = modeling_utils.safe_save_file

    def half_written(tensors, filename, metadata=None):
        original_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        die()

    modeling_utils.safe_save_file = half_written
elif point == "after-config":
    original_config_save = PretrainedConfig.save_pretrained

    def then_die(self, *args, **kwargs):
        original_config_save(self, *args, **kwargs)
        if "generation" not in type(self).__name__.lower():
            die()

    PretrainedConfig.save_pretrained = then_die
elif point.startswith("replace-"):
    remaining = [int(point.split("-")[1])]
    original_replace = os.replace

    def counted(src, dst):
        remaining[0] -= 1
        if remaining[0] == 0:
            die()
        return original_replace(src, dst)

model = AutoModelForCausalLM.from_pretrained(source)
if point.startswith("replace-"):
    os.replace = counted
model.save_pretrained(target)
print("saved")
