"""Forward distillation (LLM / SR teachers -> lightweight SR students): teacher folders, the
ensemble of several teachers, the loss zoo and the student trainer.

    from delrec.distill import TeacherExportConfig, export_teacher, load_teacher, combine_teachers
    folder = export_teacher(TeacherExportConfig(model="runs/sasrec", data="data/games", out="runs/teacher"))
    teacher = load_teacher(folder, dataset, min_topk=10)   # validated against the dataset
    train_student(dataset, SASRecConfig(), TrainConfig(), teachers=[folder], method="dllm2rec", out="runs/student")

Losses, a file and a config dataclass each: `dllm2rec.py` (importance-aware ranking distillation),
`embedding.py` (collaborative embedding distillation), `rd.py`, `rrd.py`, `hetcomp.py` (a curriculum of the
teachers' training trajectories, from teacher folders with the optional trajectory); the latent methods, on the
teacher's representations, added to any of them: `de.py` (distillation experts), `topology.py` (FTD,
HTD); `student.py` trains a student with them through `delrec.sr.trainer.train_sr`.

The teacher folder format (`teacher_folder.py`) is the contract between the two sides: any system
can write one. `teacher_folder.py` and `ensemble.py` need torch alone (students train without the
LLM stack); `teacher_export.py` imports the LLM stack only when an LLM teacher is exported.
"""

from delrec.distill.de import DEConfig
from delrec.distill.dllm2rec import DLLM2RecConfig
from delrec.distill.ensemble import combine_teachers
from delrec.distill.hetcomp import HetCompConfig
from delrec.distill.rd import RDConfig
from delrec.distill.rrd import RRDConfig
from delrec.distill.student import LatentChoice, StudentConfig, train_student
from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
from delrec.distill.teacher_folder import Teacher, Trajectory, load_teacher, write_teacher
from delrec.distill.topology import FTDConfig, HTDConfig

__all__ = [
    "DEConfig", "DLLM2RecConfig", "FTDConfig", "HTDConfig", "HetCompConfig", "LatentChoice", "RDConfig", "RRDConfig",
    "StudentConfig", "Teacher", "TeacherExportConfig", "Trajectory", "combine_teachers", "export_teacher",
    "load_teacher", "train_student", "write_teacher",
]
