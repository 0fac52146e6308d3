"""Batch ranking job over a whole split (e.g. for a teacher export or a large evaluation):

    python scripts/vllm_batch.py --backend vllm --model runs/export --data data/games --split test \
        --out runs/rank-test --readout score [--config job.yaml]

Takes exactly the options of `delrec rank` (`--backend hf` runs the same job on transformers).
The `__main__` guard is required: the vLLM engine starts worker processes that import this file.
"""

import sys

from delrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["rank", *sys.argv[1:]]))
