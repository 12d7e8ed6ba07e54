"""Which forward passes run on the event loop: measured tiny ones on an idle device only."""

from __future__ import annotations

from collections.abc import Callable

from gm_support import Model

from gpufaas.gpu_manager.inline import SPIKE, WINDOW, InlineForwards
from gpufaas.gpu_manager.runtime import NodeRuntime


def test_inline_needs_a_full_window_of_fast_passes_a_landed_model_and_an_idle_device() -> None:
    policy = InlineForwards(max_ms=1.0)
    for _ in range(WINDOW - 1):
        policy.measured("m", 0.1)
    assert not policy.inline("m", landed=True)  # not measured enough yet
    policy.measured("m", 0.1)
    assert policy.inline("m", landed=True)
    assert not policy.inline("m", landed=False)  # weights still arriving
    policy.running = 1
    assert not policy.inline("m", landed=True)  # another pass is running on the device
    policy.running = 0
    policy.measured("m", 5.0)  # one pass preempted on a busy host: still on the loop
    assert policy.inline("m", landed=True)
    policy.measured("m", 2.0)  # a second slow pass in the window sends it back to the thread
    assert not policy.inline("m", landed=True)
    for _ in range(WINDOW - 1):
        policy.measured("m", 0.1)
    assert policy.inline("m", landed=True)  # the window holds one slow pass again
    policy.measured("m", SPIKE * 1.0)  # one pass ten times too slow sends it back at once
    assert not policy.inline("m", landed=True)
    assert not policy.inline("other", landed=True)


async def test_a_tiny_model_runs_on_the_loop_once_measured_and_a_slow_one_never(
    runtime_factory: Callable[..., NodeRuntime], models: dict[str, Model], hops: list[str]
) -> None:
    model = models["tiny-mlp"]
    runtime = runtime_factory(register=[model])
    device = runtime.devices["cpu:0"]
    device.inline.max_ms = 1_000.0  # any pass is "tiny" here: the policy, not the box, decides
    for _ in range(WINDOW):
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    threaded = len(hops)
    assert threaded >= WINDOW  # the first passes are measured in a thread
    outcome = await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert len(hops) == threaded  # no hop: it ran on the loop
    assert outcome.outputs

    device.inline.max_ms = 1e-9  # now every measured pass counts as too slow for the loop
    for _ in range(2):
        await runtime.infer(model.name, model.inputs(), device_id="cpu:0")
    assert len(hops) == threaded + 2
