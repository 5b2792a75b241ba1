"""`python tests/tp_generate.py CKPT PROMPTS_JSON CONFIGS_JSON`: greedy tokens of herd's `LLM` for each
config (keyword arguments, e.g. {"tp_size": 2}), one JSON line each. Tensor-parallel runs start processes and
join a process group, so the tests run them here, in a process of their own, not in pytest's."""

from __future__ import annotations

import json
import sys

from herd.llm import LLM
from herd.sampling import SamplingParams


def main() -> None:
    path, prompts, configs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[4]), ignore_eos=True)
    for kwargs in configs:
        llm = LLM(path, dtype="float32", chunked_prefill_size=7, **kwargs)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
        llm.engine.core.close()  # the ranks stop and the process group goes: the next config makes its own


if __name__ == "__main__":
    main()
