"""Non-finite update guard: a step whose gradient, loss, perturbation or result is not finite is skipped,
decided on the device, with no host synchronisation (docs/design.md §3 "no host syncs"; docs/reliability.md).

How a step is guarded (:class:`UpdateGuard`, one per optimizer, created on its first guarded step):

1. Before ``optimizer.step()`` the flat parameter buffers and every optimizer-state tensor of the trainable
   parameters are copied into persistent backup buffers (allocated once; ``torch._foreach_copy_``).
2. ``optimizer.step()`` runs as usual.
3. ``ok = finite(loss) & finite(grad norm) & finite(perturbation) & finite(max|θ_new|) & finite(max|state_new|)``
   is a 0-dim bool tensor on the device. Under FSDP2 each rank checks its own shards (of θ and of the DTensor
   optimizer state) and ``ok`` is then AND-ed over the shard group (one all-reduce), so all ranks skip alike.
4. Every parameter buffer and every optimizer-state tensor on that device is set to
   ``torch.where(ok, new, backup)``: bit-identical to before the step when ``ok`` is false.
5. Two device counters are updated: consecutive skips (reset by a good step) and total skips; a sticky
   ``tripped`` flag is set when the consecutive count reaches ``max_consecutive_skips``.

What lives on the host cannot be gated by a device flag without a sync. Those parts are handled *lazily*
through a host mirror of the counters (a non-blocking copy into pinned memory plus a CUDA event, polled with
``event.query()`` which never blocks; on the CPU the mirror is exact and immediate):

* optimizer-state tensors on another device than the parameters (torch's default Adam/AdamW on CUDA keep
  their ``step`` count on the CPU): decremented by the number of skipped steps once the mirror shows them,
  so on CUDA the bias correction of the steps between a skip and the mirror's arrival (normally the next
  step) sees a step count one too high;
* optimizer state created by a skipped first step: on the CPU it is deleted (exactly as if the step never
  ran); on CUDA the new device tensors are reset to zero (equivalent to a fresh state for Adam, AdamW and
  SGD with momentum) and non-tensor entries are kept;
* the ``max_consecutive_skips`` check: at the start of each step, before anything is changed, the step
  raises :class:`NonFiniteError` when the mirror shows the ``tripped`` flag. On the CPU that is exactly the
  step after the limit was reached; on CUDA it can be a step or two later (never earlier).

The LR scheduler still steps on a skipped step (the schedule follows the loop position, as HF Trainer does
when its grad scaler skips a step).

Cost: one copy of θ and of the optimizer state per step plus one ``where`` per tensor -- negligible for LoRA
adapters, about one extra read/write pass over the optimizer state for full fine-tuning. Disable it with
``guard_nonfinite=False`` in the step configs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .distributed import all_ranks_true, local_tensor

__all__ = ["NonFiniteError", "UpdateGuard", "guard_for"]


class NonFiniteError(RuntimeError):
    """Raised at the start of a step after ``max_consecutive_skips`` consecutive steps were skipped because
    their gradient, loss or update was not finite (NaN or inf)."""


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _opt_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _n_opt_params(optimizer: torch.optim.Optimizer) -> int:
    """O(number of groups): detects ``add_param_group`` (the cached check is redone then)."""
    return sum(len(g["params"]) for g in optimizer.param_groups)


class UpdateGuard:
    """Guard state of one optimizer (see the module docstring). Build it with :func:`guard_for`."""

    def __init__(self, optimizer: torch.optim.Optimizer, flat, owner: str) -> None:
        self._check_optimizer(optimizer, flat, owner)
        self.flat = flat
        self.device = flat.device
        dev = self.device
        self.consecutive = torch.zeros((), dtype=torch.int64, device=dev)
        self.total = torch.zeros((), dtype=torch.int64, device=dev)
        self.tripped = torch.zeros((), dtype=torch.bool, device=dev)
        self._theta_backup: list[torch.Tensor] | None = None  # allocated on the first guarded step
        self._state_backup: dict[tuple[int, str], torch.Tensor] = {}
        # host mirror of (consecutive, total, tripped)
        pin = dev.type == "cuda"
        self._mirror = torch.zeros(3, dtype=torch.int64, pin_memory=pin)
        self._event = None
        self._host_total = 0  # skips already applied to the host-resident state
        self._host_counters: list[tuple[dict, str]] = []  # (state dict, key) of host-resident 0-dim tensors
        self._host_keys: set[tuple[int, str]] = set()
        self._n_opt_params = _n_opt_params(optimizer)

    # --------------------------------------------------------------------------------------- checks
    @staticmethod
    def _check_optimizer(optimizer, flat, owner: str) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        held = _opt_param_ids(optimizer)
        mine = [p for p in flat.parameters]
        if not any(id(p) in held for p in mine):
            raise ValueError(
                f"{owner}: the optimizer holds none of the model's {len(mine)} trainable parameters, so the step "
                "would train nothing; build it on [p for p in model.parameters() if p.requires_grad] (after "
                "add_lora / get_peft_model, and on this model object)"
            )
        for p in mine:
            if id(p) not in held:
                continue
            st = optimizer.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point():
                    if v.dtype != p.dtype or v.device != p.device:
                        raise ValueError(
                            f"{owner}: the optimizer's state {k!r} of a parameter is {v.dtype} on {v.device} but the "
                            f"parameter is now {p.dtype} on {p.device} (model.to(...) after the optimizer took a "
                            "step); rebuild the optimizer, or reload its state with "
                            "optimizer.load_state_dict(optimizer.state_dict()), which casts it"
                        )

    def poll(self, max_consecutive_skips: int | None, owner: str) -> None:
        """Read the host mirror if it is ready (never blocks on CUDA) and apply the lazy host-side corrections;
        raise :class:`NonFiniteError` when the consecutive-skip limit was reached. Call before any change."""
        if self._event is not None and not self._event.query():
            return
        consecutive, total, tripped = (int(x) for x in self._mirror.tolist())
        self._apply_host_skips(total)
        if max_consecutive_skips is not None and tripped:
            raise NonFiniteError(
                f"{owner}: {consecutive} consecutive steps were skipped because the loss, the gradient or the "
                f"update was not finite (NaN/inf), reaching max_consecutive_skips={max_consecutive_skips}; the "
                "parameters and optimizer state are those of the last good step. Check the data for corrupt "
                "records, lower the learning rate / rho, or enable gradient clipping"
            )

    def _apply_host_skips(self, total: int) -> None:
        delta = total - self._host_total
        if delta <= 0:
            return
        with torch.no_grad():
            for st, key in self._host_counters:
                v = st.get(key)
                if isinstance(v, torch.Tensor):
                    v.sub_(delta)
        self._host_total = total

    # --------------------------------------------------------------------------------------- the step
    def _state_items(self, optimizer) -> list[tuple[dict, str, torch.Tensor]]:
        out = []
        for p in self.flat.parameters:
            st = optimizer.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor):  # FSDP2 state is DTensors: guard their local shards
                    out.append((st, k, local_tensor(v)))
        return out

    def step(
        self,
        optimizer,
        scheduler,
        ok: torch.Tensor,
        max_consecutive_skips: int | None,
    ) -> torch.Tensor:
        """``optimizer.step()`` then undo it on the device when ``ok`` (0-dim bool) is false; returns the
        ``skipped`` flag (0-dim bool device tensor)."""
        dev = self.device
        theta = self.flat.param_buffers
        fresh_before: dict[int, bool] = {}
        if self._theta_backup is None:
            self._theta_backup = [torch.empty_like(b) for b in theta]
        with torch.no_grad():
            torch._foreach_copy_(self._theta_backup, theta)
            before = self._state_items(optimizer)
            keys_before = set()
            dsts, srcs = [], []
            for st, k, v in before:
                key = (id(st), k)
                keys_before.add(key)
                b = self._state_backup.get(key)
                if b is None or b.shape != v.shape or b.dtype != v.dtype or b.device != v.device:
                    b = torch.empty_like(v)
                    self._state_backup[key] = b
                dsts.append(b)
                srcs.append(v)
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            if len(self._state_backup) > len(
                keys_before
            ):  # state replaced (load_state_dict): drop old buffers
                self._state_backup = {k: self._state_backup[k] for k in keys_before}
                live = {id(st) for st, _, _ in before}
                self._host_counters = [(st, k) for st, k in self._host_counters if id(st) in live]
                self._host_keys = {(id(st), k) for st, k in self._host_counters}
            for p in self.flat.parameters:
                fresh_before[id(p)] = not optimizer.state.get(p)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            after = self._state_items(optimizer)
            finite_parts = [t for t in theta if t.numel()]
            finite_parts += [
                v for _, _, v in after if v.device == dev and v.is_floating_point() and v.numel()
            ]
            if finite_parts:
                maxes = torch._foreach_norm(finite_parts, float("inf"))
                ok = ok & torch.isfinite(torch.stack([m.float() for m in maxes]).max())
            if self.flat.sharded:  # each rank checked its own shards: skip on every rank or on none
                ok = all_ranks_true(ok, self.flat.shard_group)
            for t, b in zip(theta, self._theta_backup):
                torch.where(ok, t, b, out=t)
            for st, k, v in after:
                key = (id(st), k)
                if v.device != dev:
                    if v.dim() == 0 and key not in self._host_keys:
                        self._host_keys.add(key)
                        self._host_counters.append((st, k))
                    continue
                if key in keys_before:
                    torch.where(ok, v, self._state_backup[key], out=v)
                else:  # created by this step: back to zero when skipped
                    torch.where(ok, v, torch.zeros((), dtype=v.dtype, device=dev), out=v)
            skipped = ~ok
            s64 = skipped.to(torch.int64)
            self.consecutive.add_(1).mul_(s64)  # skipped: +1; applied: reset to 0
            self.total.add_(s64)
            if max_consecutive_skips is not None:
                self.tripped |= self.consecutive >= int(max_consecutive_skips)
            packed = torch.stack([self.consecutive, self.total, self.tripped.to(torch.int64)])
            if dev.type == "cuda":
                self._mirror.copy_(packed, non_blocking=True)
                if self._event is None:
                    self._event = torch.cuda.Event()
                self._event.record()
            else:
                self._mirror.copy_(packed)
                if bool(skipped):  # CPU: exact host-side restoration (no device to sync with)
                    for p in self.flat.parameters:
                        if fresh_before.get(id(p)) and p in optimizer.state:
                            del optimizer.state[p]
        return skipped


def guard_for(optimizer: torch.optim.Optimizer, flat, owner: str) -> UpdateGuard:
    """The :class:`UpdateGuard` of ``optimizer`` for the flat parameters ``flat`` (created once and cached;
    rebuilt when the model's flat parameters were re-packed or the optimizer's parameter set changed). The
    creation checks that the optimizer holds at least one of the trainable parameters (``ValueError``)."""
    g = _GUARDS.get(optimizer)
    if g is None or g.flat is not flat or g._n_opt_params != _n_opt_params(optimizer):
        prev = g
        g = UpdateGuard(optimizer, flat, owner)
        if prev is not None:  # keep the counters across a re-pack
            g.consecutive, g.total, g.tripped = prev.consecutive, prev.total, prev.tripped
            g._mirror, g._event, g._host_total = prev._mirror, prev._event, prev._host_total
        _GUARDS[optimizer] = g
    return g


def peek_guard(optimizer) -> Any:
    """The cached guard of ``optimizer`` or None (no creation)."""
    try:
        return _GUARDS.get(optimizer)
    except TypeError:
        return None
