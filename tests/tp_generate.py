"""`python tests/tp_generate.py JOBS_JSON MAX_TOKENS`: greedy tokens of herd's `LLM` for each job
`[checkpoint, prompts, engine kwargs (e.g. {"tp_size": 2})]`, one JSON line each. Tensor-parallel runs start
processes and join a process group, so the tests run them here, in a process of their own, not in pytest's."""

from __future__ import annotations

import json
import sys

from herd.llm import LLM
from herd.sampling import SamplingParams


def main() -> None:
    jobs, max_tokens = json.loads(sys.argv[1]), int(sys.argv[2])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for path, prompts, kwargs in jobs:
        llm = LLM(path, dtype="float32", chunked_prefill_size=7, **kwargs)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
        llm.engine.core.close()  # the ranks stop and the process group goes: the next job makes its own


if __name__ == "__main__":
    main()
