"""The pod planner: a config's real steps compiled ahead of time for a TPU slice on any host, with their HBM per chip
and roofline bounds (`python -m sfd_jax.cli.plan`; the method is in `roofline`).

Modules, each importing only those before it: `topology` (slice names → libtpu devices), `hlo` (the optimised HLO's
text read into instructions), `hlo_costs` (loop trip counts, FLOPs, bytes, collectives), `programs` (the steps as
the trainer, sampler and extractor build them), `report` (text for the terminal), `roofline` (compile one program,
bound its step time; plan a config), `layout_search` (rank the train step's layouts). The chip table, a leaf that
the trainer's MFU reads too, is `sfd_jax.chips`.
"""
from sfd_jax.plan.hlo_costs import HloCosts, analyse_hlo
from sfd_jax.plan.layout_search import search
from sfd_jax.plan.programs import Program, extract_program, sample_programs, train_program
from sfd_jax.plan.report import format_candidate, format_program
from sfd_jax.plan.roofline import compile_program, executable, plan, plan_summary, state_bytes
from sfd_jax.plan.topology import topology_string, tpu_devices

__all__ = ["HloCosts", "Program", "analyse_hlo", "compile_program", "executable", "extract_program",
           "format_candidate", "format_program", "plan", "plan_summary", "sample_programs", "search", "state_bytes",
           "topology_string", "tpu_devices", "train_program"]
