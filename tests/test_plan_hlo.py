"""The planner's HLO cost rule on programs small enough to count by hand: loops it counts are counted in full, a loop
whose trip count the HLO does not show is reported as not counted (never costed once in silence). XLA:CPU's
optimised HLO and hand-written HLO text; no libtpu needed."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from sfd_jax import plan
from sfd_jax.chips import chip_of
from sfd_jax.plan import hlo_costs

X = jnp.ones((16, 16), jnp.float32)
MATMUL = 2 * 16 ** 3  # FLOPs of one (16, 16) @ (16, 16), as XLA counts them (2 per multiply-add)


def counted(x):
  return lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ x), x)


def data_dependent(x):
  """Squares until a running sum passes 100: the trip count depends on the values."""
  return lax.while_loop(lambda c: c[1] < 100.0, lambda c: (jnp.tanh(c[0] @ c[0]), c[1] * 2.0 + jnp.sum(c[0])),
                        (x, 1.0))


def test_a_counted_loop_is_costed_for_every_iteration():
  """7 iterations of a matmul, the counter's add and the condition's compare: XLA's cost model counts one, the
  rule adds the other 6."""
  costs = hlo_costs.analyse_hlo(jax.jit(counted).lower(X).compile().as_text())
  assert costs.loop_trip_counts == [7] and costs.loops_not_counted == []
  assert costs.flops_loop_extra == 6 * (MATMUL + 2)


def test_a_data_dependent_loop_is_reported_not_counted():
  costs = hlo_costs.analyse_hlo(jax.jit(data_dependent).lower(X).compile().as_text())
  assert costs.loop_trip_counts == [] and costs.flops_loop_extra == 0
  (loop,) = costs.loops_not_counted
  assert "jit(data_dependent)/while" in loop


def test_the_plan_says_which_loops_it_did_not_count():
  """compile_program (here for the CPU, with the v5e's numbers) puts the loop in the plan and its text."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  x = jax.ShapeDtypeStruct(X.shape, X.dtype, sharding=cpu)
  result = plan.compile_program(plan.Program("halving", jax.jit(data_dependent), (x,), 1, 0.0), chip_of("TPU v5e"),
                                1)
  assert result["loops"]["trip_counts"] == [] and len(result["loops"]["not_counted"]) == 1
  text = plan.format_program("halving", result)
  assert "NOT COUNTED: 1 while loop(s)" in text and "jit(data_dependent)/while" in text
  assert "NOT COUNTED" in plan.format_candidate({"data": 1, "fsdp": 1, "remat_policy": "none",
                                                 "grad_accum_steps": 1, **result})


# A loop without XLA's known_trip_count annotation: the counter starts at INIT, the body adds STEP, the condition
# is counter < 10; the body squares an f32[8] (8 FLOPs) and adds (1), the condition compares (1).
_HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %step = s32[] STEP
  %next = s32[] add(%i.1, %step)
  %x = f32[8] get-tuple-element(%p.1), index=1
  %y = f32[8] multiply(%x, %x)
  ROOT %t = (s32[], f32[8]) tuple(%next, %y)
}

ENTRY %main (x.0: f32[8], start: s32[]) -> (s32[], f32[8]) {
  %x.0 = f32[8] parameter(0)
  %start = s32[] parameter(1)
  %one = s32[] constant(1)
  %init = (s32[], f32[8]) tuple(INIT, %x.0)
  ROOT %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/while"}
}
"""


def test_an_unannotated_counter_is_evaluated():
  costs = hlo_costs.analyse_hlo(_HLO.replace("STEP", "constant(2)").replace("INIT", "%one"))
  assert costs.loop_trip_counts == [5]  # 1, 3, 5, 7, 9
  assert costs.flops_loop_extra == 4 * (8 + 1 + 1)


@pytest.mark.parametrize("step, init", [("constant(2)", "%start"), ("get-tuple-element(%p.1), index=0", "%one")],
                         ids=["start_unknown", "step_not_constant"])
def test_an_unknown_start_or_step_is_not_guessed(step, init):
  costs = hlo_costs.analyse_hlo(_HLO.replace("STEP", step).replace("INIT", init))
  assert costs.loop_trip_counts == [] and costs.loops_not_counted == ["w (jit(f)/while)"]
  assert costs.flops_loop_extra == 0
