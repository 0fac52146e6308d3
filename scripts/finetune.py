"""DELRec stage 2 for `accelerate launch` (one process, DDP or FSDP):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/finetune.py --config configs/delrec/...

Takes exactly the options of `delrec llm finetune`.
"""

import sys

from delrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["llm", "finetune", *sys.argv[1:]]))
