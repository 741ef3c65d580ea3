"""
What goes wrong during a run, and what the run does then. A bad update is not applied: one whose loss is NaN/Inf or
spikes far above its running average, whose gradients are non-finite or their norm far above its running average
(guard_update: judged before stepping), or that blew the weights up once applied (guarded_update puts the weights
and the optimizer state back as they were). The run stops after max_bad_steps of them in a row, saving the weights
from before the first one (read_guard, guard_trip_error). SIGTERM (preemption) and SIGINT (Ctrl-C) make the loop
finish its step, save and exit 0 (catch_stop_signals, stop_requested), printing the command that goes on
(resume_command).
"""
import json
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist

from muon import Muon

# The run stops rather than roll back and lower the LR: a silent LR change would alter the experiment, while a
# stop with the pre-fault weights lets a person choose (the PaLM remedy for spikes is the same: restart from
# before the spike and skip the bad batches, which is what resuming from this checkpoint does, since the data
# position is past them).
# The loss and gradient checks run on the device; the host reads one flag a step (whether the applied update must
# be undone: a host decision) and the counters at log steps only.
GUARD_BETA, GUARD_WARMUP = 0.99, 10  # running average over ~100 good steps; spikes are judged after 10 of them
# A gradient norm this many times its running average is an explosion, not noise (healthy runs stay within ~3x
# after the first steps); and an update that multiplies the weights' norm by UPDATE_LIMIT has blown them up (a
# healthy step changes it by well under 1%). Neither needs a setting: both are far from any healthy step.
NORM_FACTOR, UPDATE_LIMIT = 10.0, 2.0
GUARD_FIELDS = ("ema", "good", "in_row", "total", "tripped", "last_bad_loss", "norm_ema", "norm_good", "kind")
# norm_ema, norm_good: the gradient norm's running average and its count (older checkpoints lack them: 0, 0);
# kind: the first fault's kind (guard_trip_error names it): 1 loss NaN/Inf, 2 loss spike, 3 gradients NaN/Inf,
# 4 gradient norm spike, 5 the applied update blew the weights up


def guard_update(g, loss, grad_norm, spike_factor, max_bad_steps, blown=None):
    """One step of the bad-update guard, before stepping. g: float32 tensor of GUARD_FIELDS, updated in place; loss:
    the step's (0-d) loss, the same on every rank; grad_norm: the total gradient norm (before clipping) or None;
    blown: a 0-d bool, True when guarded_update found the update applied with these values blew the weights up.
    Returns a 0-d float32 tensor: 1.0 = skip this update. Once tripped (max_bad_steps in a row), every
    later update is skipped too, so the weights stay those from before the fault until the host stops."""
    ema, good, in_row, total, tripped, last, norm_ema, norm_good, kind = g.unbind()
    loss = loss.detach().float()
    avg = lambda ema, n: ema / (1 - GUARD_BETA ** n).clamp(min=1e-12)  # bias-corrected, as in Adam
    kinds = [(~torch.isfinite(loss), 1),
             ((good >= GUARD_WARMUP) & (loss > spike_factor * avg(ema, good)) if spike_factor else None, 2)]
    if grad_norm is not None:
        grad_norm = grad_norm.detach().float()
        kinds += [(~torch.isfinite(grad_norm), 3),
                  ((norm_good >= GUARD_WARMUP) & (grad_norm > NORM_FACTOR * avg(norm_ema, norm_good)), 4)]
    kinds.append((blown, 5))
    fault, new_kind = torch.zeros((), dtype=torch.bool, device=g.device), torch.zeros((), device=g.device)
    for flag, k in reversed([(f, k) for f, k in kinds if f is not None]):  # the first listed kind wins
        fault, new_kind = fault | flag, torch.where(flag, float(k), new_kind)
    bad = fault | (tripped > 0)
    in_row = torch.where(bad, in_row + 1, 0.0)
    norm_avg = norm_ema if grad_norm is None else GUARD_BETA * norm_ema + (1 - GUARD_BETA) * grad_norm
    keep_norm = bad | (grad_norm is None)  # the norm's average moves only with good steps that have one
    first = fault & (tripped == 0)
    new = torch.stack([torch.where(bad, ema, GUARD_BETA * ema + (1 - GUARD_BETA) * loss),
                       good + (~bad).float(), in_row, total + bad.float(),
                       torch.maximum(tripped, (in_row >= max_bad_steps).float()),
                       torch.where(first, loss, last), torch.where(keep_norm, norm_ema, norm_avg),
                       norm_good + (~keep_norm).float(), torch.where(first, new_kind, kind)])
    g.copy_(new)
    return bad.float()


def total_norm(tensors):
    """The 2-norm of many tensors together, as one 0-d tensor (FSDP's DTensor shards: summed over the ranks)."""
    norm = torch.nn.utils.get_total_norm([t.detach() for t in tensors])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def guarded_update(optimizers, scaler, guard, params, loss, grad_norm, *, spike_factor, max_bad_steps, judge=True):
    """guard_update, then apply_update, then the update itself judged: if it made the weights non-finite or
    multiplied their norm by UPDATE_LIMIT or more (an exploding learning rate gives such an update from ordinary
    gradients), the weights, the optimizers' state and the guard are put back as they were before the step and
    the guard counts it bad. The copy costs the size of the weights and optimizer state in memory while the
    step runs, and the decision one host sync a step: judge=False skips it (guard_update and apply_update only)."""
    if not judge:
        return apply_update(optimizers, scaler, guard_update(guard, loss, grad_norm, spike_factor, max_bad_steps))
    before, saved = guard.clone(), snapshot(params, optimizers)
    apply_update(optimizers, scaler, guard_update(guard, loss, grad_norm, spike_factor, max_bad_steps))
    old, new = total_norm(saved[0]), total_norm(params)
    blown = ~torch.isfinite(new) | (new >= UPDATE_LIMIT * old)
    if blown.item():
        restore(params, optimizers, saved)
        guard.copy_(before)
        guard_update(guard, loss, grad_norm, spike_factor, max_bad_steps, blown=blown)


def optimizer_states(optimizers):
    """The state dicts ({param: {name: value}}) of the optimizers, ZeRO's inner AdamW's for ZeRO."""
    return [getattr(opt, "optim", opt).state for opt in optimizers]


def snapshot(params, optimizers):
    """Copies of the weights and of the optimizers' state, for restore."""
    clone = lambda v: v.detach().clone() if torch.is_tensor(v) else v
    states = optimizer_states(optimizers)
    return [clone(p) for p in params], [{p: {k: clone(v) for k, v in s.items()} for p, s in st.items()}
                                        for st in states]


def restore(params, optimizers, saved):
    """The weights and optimizer state of snapshot back in place (state made by the step since then goes: an
    optimizer that never stepped has none)."""
    weights, states = saved
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for state, old in zip(optimizer_states(optimizers), states):
        for p in list(state):
            if p not in old:
                del state[p]
        for p, s in old.items():
            state[p] = s


def apply_update(optimizers, scaler, bad):
    """Steps each optimizer unless bad (0-d float32 tensor, 1.0 = skip) - skipped means nothing changes, not the
    weights, not the moments, not the step count. Fused AdamW (CUDA) and Muon take the skip flag on the device
    (`found_inf`, the hook GradScaler uses), so no host sync. Otherwise the host reads the flag: free on a CPU; with
    fp16's GradScaler a sync the scaler makes anyway."""
    for optimizer in optimizers:
        inner = getattr(optimizer, "optim", optimizer)  # ZeRO steps an AdamW of its own over this rank's part
        if (inner.defaults.get("fused") or isinstance(inner, Muon)) and not scaler.is_enabled():
            inner.found_inf = bad
            optimizer.step()
            inner.found_inf = None
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
              f"last loss {state[GUARD_FIELDS.index('last_bad_loss')]:.4g}")
    if not state[GUARD_FIELDS.index("tripped")]:
        return total, None
    guard[GUARD_FIELDS.index("in_row")] = guard[GUARD_FIELDS.index("tripped")] = 0
    return total, guard_trip_error(state, iter_num, spike_factor, max_bad_steps, out_dir)


def guard_trip_error(guard, iter_num, spike_factor, max_bad_steps, out_dir):
    """The one-line error of a tripped guard (guard: its GUARD_FIELDS as floats): from which step the bad
    updates ran, which of guard_update's faults the last one was, and what to do."""
    ema, good, in_row, total, tripped, last, norm_ema, norm_good, kind = guard
    first = iter_num - int(in_row)
    avg = ema / (1 - GUARD_BETA ** good) if good else math.nan  # ema and good stay put over bad steps: the avg used
    why = {1: f"loss {last}", 2: f"loss {last:.4g} > spike_factor {spike_factor} x running average {avg:.4g}",
           3: f"non-finite gradients at loss {last:.4g}",
           4: f"gradient norm > {NORM_FACTOR:g} x its running average at loss {last:.4g}",
           5: f"an update that blew the weights up (their norm x{UPDATE_LIMIT:g} or more, or NaN/Inf) at loss "
              f"{last:.4g}"}.get(int(kind), f"loss {last:.4g}")
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


def interrupted_note(out_dir):
    """What a second Ctrl-C leaves behind, for its last line: the last checkpoint, or none to resume."""
    try:
        with open(os.path.join(out_dir, "latest.json")) as fh:
            return f"the last checkpoint in {out_dir} (step {json.load(fh)['iter_num']}) is kept"
    except (OSError, ValueError, KeyError, TypeError):
        return f"no checkpoint was saved in {out_dir} yet: start the run again (without --init_from=resume)"


# ---------------------------------------------------------------------------- train.py's loop, at each step


def faults_and_stops(run, cfg, at_log, save, stop_group):
    """Faults and stop signals, acted on where every rank agrees (the guard is the same on all; a signal is agreed
    on at log steps). max_bad_steps bad updates in a row: the weights from before them saved, then a one-line error.
    SIGTERM / SIGINT: saved, and True (the loop ends)."""
    if at_log or run.iter_num == cfg.max_iters:
        run.bad_seen, error = read_guard(run.guard, run.bad_seen, run.iter_num, run.master, cfg.spike_factor,
                                         cfg.max_bad_steps, cfg.out_dir)
        if error:
            save()
            raise SystemExit(error)
    run.stopped = stop_requested(run.world, at_log, stop_group)
    if run.stopped:
        save()
    return run.stopped


def farewell(run, cfg):
    """The run's last lines: how far it got, and how to go on if a signal stopped it."""
    best = (f"best val loss {run.best_val_loss:.4f} ({run.best_val_loss / math.log(2) / run.bytes_per_token:.4f} "
            f"bits/byte)" if math.isfinite(run.best_val_loss) else "no evaluation yet")
    summary = (f"{run.iter_num} steps, {run.iter_num * run.tokens_per_iter:,} tokens in "
               f"{time.time() - run.t_launch:.0f}s; {best}")
    if not run.stopped:
        return f"done: {summary}; checkpoint in {cfg.out_dir}"
    # SIGTERM sent to torchrun itself: torchrun forwards it to every rank, which saves and says this, and then
    # exits 1 itself (its SignalException), whatever the ranks did: train.py cannot change torchrun's exit code
    launcher = (" (torchrun exits 1 if it was the one signalled; the checkpoint is whole. Signalled instead, its "
                "ranks stop the same way and it exits 0: pkill -TERM -P <torchrun's pid>)" if run.world > 1 else "")
    return (f"so far: {summary}\nstopped by {STOP.get('signal', 'a signal on another rank')} at step {run.iter_num}; "
            f"checkpoint saved in {cfg.out_dir}{launcher}. Resume with: {resume_command(run.world, sys.argv)}")
