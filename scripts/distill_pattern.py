"""DELRec stage 1 for `accelerate launch` (one process, or DDP; not FSDP):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/distill_pattern.py --config configs/delrec/...

Takes exactly the options of `delrec llm distill-pattern`.
"""

import sys

from delrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["llm", "distill-pattern", *sys.argv[1:]]))
