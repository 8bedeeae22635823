"""Run by tests/test_training.py under ``accelerate launch``: trains through ``lorweb_fast.training.train`` (what
``lorweb-fast train`` runs) and writes this rank's LoRWeB parameters to OUT/rank<i>.safetensors."""

import json
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from lorweb_fast import lorweb_state_dict
from lorweb_fast.training import TrainConfig, train

cfg = TrainConfig(**json.loads(sys.argv[1]))
result = train(cfg)
state = PartialState()
tensors = {k: v.contiguous() for k, v in lorweb_state_dict(result["transformer"]).items()}
save_file(tensors, f"{cfg.out}/rank{state.process_index}.safetensors",
          metadata={"world_size": str(state.num_processes), "backend": str(state.backend)})
