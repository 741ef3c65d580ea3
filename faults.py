"""
What goes wrong during a run, and what the run does then. A bad update (loss NaN/Inf, or a spike far above the
running average) is skipped (guard_update, apply_update), and the run stops after max_bad_steps of them in a row,
saving the weights from before the first one (read_guard, guard_trip_error). SIGTERM (preemption) and SIGINT
(Ctrl-C) make the loop finish its step, save and exit 0 (catch_stop_signals, stop_requested), printing the command
that goes on (resume_command).
"""
import math
import os
import shlex
import signal

import torch
import torch.distributed as dist

# The run stops rather than roll back and lower the LR: a silent LR change would alter the experiment, while a
# stop with the pre-fault weights lets a person choose (the PaLM remedy for spikes is the same: restart from
# before the spike and skip the bad batches, which is what resuming from this checkpoint does, since the data
# position is past them).
# The decision is made on the device: no host sync per step. The host reads the counters at log steps only.
GUARD_BETA, GUARD_WARMUP = 0.99, 10  # running average over ~100 good steps; spikes are judged after 10 of them
GUARD_FIELDS = ("ema", "good", "in_row", "total", "tripped", "last_bad_loss")


def guard_update(g, loss, grad_norm, spike_factor, max_bad_steps):
    """One step of the bad-update guard. g: float32 tensor of GUARD_FIELDS, updated in place; loss: the
    step's (0-d) loss, the same on every rank; grad_norm: the total gradient norm or None.
    Returns a 0-d float32 tensor: 1.0 = skip this update. Once tripped (max_bad_steps in a row), every
    later update is skipped too, so the weights stay those from before the fault until the host stops."""
    ema, good, in_row, total, tripped, last = g.unbind()
    loss = loss.detach().float()
    avg = ema / (1 - GUARD_BETA ** good).clamp(min=1e-12)  # bias-corrected, as in Adam
    fault = ~torch.isfinite(loss)
    if grad_norm is not None:
        fault |= ~torch.isfinite(grad_norm)
    if spike_factor:
        fault |= (good >= GUARD_WARMUP) & (loss > spike_factor * avg)
    bad = fault | (tripped > 0)
    in_row = torch.where(bad, in_row + 1, 0.0)
    new = torch.stack([torch.where(bad, ema, GUARD_BETA * ema + (1 - GUARD_BETA) * loss),
                       good + (~bad).float(), in_row, total + bad.float(),
                       torch.maximum(tripped, (in_row >= max_bad_steps).float()),
                       torch.where(fault & (tripped == 0), loss, last)])
    g.copy_(new)
    return bad.float()


def apply_update(optimizers, scaler, bad):
    """Steps each optimizer unless bad (0-d float32 tensor, 1.0 = skip) - skipped means nothing changes, not the
    weights, not the moments, not the step count. Fused AdamW (CUDA) takes the skip flag on the device
    (`found_inf`, the hook GradScaler uses), so no host sync. Otherwise the host reads the flag: free on a CPU; on a
    GPU one sync a step (Muon has no such hook); with fp16's GradScaler a sync the scaler makes anyway."""
    for optimizer in optimizers:
        inner = getattr(optimizer, "optim", optimizer)  # ZeRO steps an AdamW of its own over this rank's part
        if inner.defaults.get("fused") and not scaler.is_enabled():
            inner.found_inf = bad
            optimizer.step()
            del inner.found_inf
        elif not bad.item():
            scaler.step(optimizer)


def check_guard_settings(max_bad_steps, spike_factor):
    if max_bad_steps < 1 or not (spike_factor == 0 or spike_factor > 1):
        raise SystemExit(f"error: max_bad_steps must be >= 1 (got {max_bad_steps}) and spike_factor 0 (off) or > 1 "
                         f"(got {spike_factor})")


def read_guard(guard, bad_seen, iter_num, master, spike_factor, max_bad_steps, out_dir):
    """The guard's count of bad updates, read by the host (a sync: at log steps only), saying how many were skipped
    since the count bad_seen. Returns (that count, the error to stop with if the guard tripped, else None); a tripped
    guard is reset first, so that the checkpoint saved with it trains on when resumed."""
    state = guard.tolist()
    total = state[GUARD_FIELDS.index("total")]
    if total > bad_seen and master:
        print(f"step {iter_num}: skipped {total - bad_seen:.0f} bad update(s) ({total:.0f} in all), "
              f"last loss {state[-1]:.4g}")
    if not state[GUARD_FIELDS.index("tripped")]:
        return total, None
    guard[GUARD_FIELDS.index("in_row")] = guard[GUARD_FIELDS.index("tripped")] = 0
    return total, guard_trip_error(state, iter_num, spike_factor, max_bad_steps, out_dir)


def guard_trip_error(guard, iter_num, spike_factor, max_bad_steps, out_dir):
    """The one-line error of a tripped guard (guard: its GUARD_FIELDS as floats): from which step the bad
    updates ran, which of guard_update's three faults the last one was, and what to do."""
    ema, good, in_row, total, tripped, last = guard
    first = iter_num - int(in_row)
    avg = ema / (1 - GUARD_BETA ** good) if good else math.nan  # ema and good stay put over bad steps: the avg used
    why = (f"loss {last}" if not math.isfinite(last) else
           f"loss {last:.4g} > spike_factor {spike_factor} x running average {avg:.4g}"
           if spike_factor and good >= GUARD_WARMUP and last > spike_factor * avg else
           f"non-finite gradients at loss {last:.4g}")
    return (f"error: {max_bad_steps} bad updates in a row from step {first} ({why}); skipped them all and saved "
            f"the weights from before step {first} in {out_dir} (resuming skips those batches). Lower learning_rate "
            f"or check the data, or raise max_bad_steps / spike_factor; then resume with --init_from=resume")


STOP = {}  # {"signal": name} once SIGTERM (preemption) or SIGINT (Ctrl-C) arrived


def request_stop(signum, frame):
    """Signal handler: ask the loop to stop after the current step and save. A second signal acts at once."""
    STOP["signal"] = signal.Signals(signum).name
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    os.write(2, f"{STOP['signal']}: finishing this step and saving a checkpoint "
                f"(send it again to quit without saving)\n".encode())


def catch_stop_signals(world, device):
    """From here on SIGTERM (preemption) and SIGINT (Ctrl-C) make the loop finish its step, save and exit 0
    (request_stop). Returns the CPU (gloo) group over which the ranks agree to stop (stop_requested), or None."""
    STOP.clear()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, request_stop)
    return dist.new_group(backend="gloo") if world > 1 and device.startswith("cuda") else None


def stop_requested(world, at_log_step, group=None):
    """Whether SIGTERM / SIGINT asked to stop. One process checks its flag every step (a Python bool: free); under
    torchrun the ranks agree at log steps, by an all-reduce of the flag on a CPU (gloo) group, which needs no GPU
    sync; so the grace period before SIGKILL must cover log_interval steps."""
    if world == 1 or not at_log_step:
        return world == 1 and bool(STOP)
    flag = torch.tensor([float(bool(STOP))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.item() > 0


def resume_command(world, argv):
    """The command that goes on from this run's checkpoint: the same one, with --init_from=resume."""
    args = shlex.join(a for a in argv[1:] if not a.startswith("--init_from="))
    return f"{'python' if world == 1 else 'torchrun (same options)'} {argv[0]} {args} --init_from=resume"
