"""Router record / replay across a whole model (SPEC §3.1 step 7).

:class:`RouterReplay` attaches to every routing layer of a model (``mo.MoE``, a standalone
``mo.Router``, or any module with ``_mojo_routing_layer = True`` whose forward takes
``forced_expert_ids=`` and sets ``last_topk_ids``) and keys each by its qualified module name, so
an extra layer (an MTP head, say) has its own key and can never take another layer's ids.

- ``record()``: every layer's ``topk_ids`` of the forward(s) run inside the block are kept.  With
  :meth:`RouterReplay.allocate_static` they are ``copy_``-ed into buffers preallocated per layer, so
  recording works inside a CUDA graph (the buffers hold each graph replay's routing).
- ``replay(ids)``: every layer routes with the given ids (``forced_expert_ids``); the weights still
  come from the live scores, so the router keeps its gradient.  A layer without ids is an error.
- Activation checkpointing: every forward of an attached layer tags its own autograd graph with the
  session it ran in (an identity node on the layer input; a forward that runs without autograd
  inside a custom ``autograd.Function`` forward, which is how reentrant checkpointing runs its
  forward, tags that Function's node instead).  A forward that autograd recomputes during backward
  (``torch.utils.checkpoint``, reentrant or not, with or without activation offloading) reads the
  tag nearest to the backward node being executed, i.e. the tag of the very forward it recomputes,
  and routes as that forward did, whatever the order of the backwards and after its session ended.
  A recorded or natural forward is recomputed with natural routing: forcing the ids there could
  take another code path (e.g. a kernel that declines forced ids), which non-reentrant
  checkpointing rejects; the reference routing is deterministic, so the recomputed ids equal the
  recorded ones.
- ``export()`` / ``export_stacked()`` / ``load()``: ids as ``{name: [T, K]}`` or one ``[L, T, K]``
  tensor plus the layer names, so an inference engine's record can drive a trainer's replay.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections import deque
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["RouterReplay", "in_backward"]


def in_backward() -> bool:
    """True while autograd executes a backward pass, i.e. where checkpointing recomputes forwards."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else (x.shape[0] if x.dim() else 0)


class _Session:
    """What the forwards of one record/replay session (or of no session) route with: ``targets``
    (``{layer name: ids}``) for a replay session, None for natural routing (recording included)."""

    def __init__(self, targets: dict | None = None):
        self.targets = targets


class _Tag(torch.autograd.Function):
    """Identity on a routing layer's input whose node carries ``{RouterReplay: _Session}``: the
    autograd graph of a forward thereby knows the session that forward routed with.  It saves no
    tensor, so checkpointing sees the same saved tensors with or without it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, anchor, tags):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx._mojo_routing = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.needs_input_grad[0] else None), None, None


_FunctionCtx = torch.autograd.function.BackwardCFunction


def _function_forward_contexts() -> list:
    """The ctx of every custom ``autograd.Function`` forward on this thread's stack, innermost first
    (reentrant checkpointing runs the checkpointed forward inside one, without autograd)."""
    out = []
    f = sys._getframe(2)
    while f is not None:
        co = f.f_code
        if co.co_name == "forward" and co.co_argcount:
            ctx = f.f_locals.get(co.co_varnames[0])
            if isinstance(ctx, _FunctionCtx):
                out.append(ctx)
        f = f.f_back
    return out


def _current_node():
    get = getattr(torch._C, "_current_autograd_node", None)
    return get() if get is not None else None


class RouterReplay:
    """Record the routing of every MoE layer of ``model`` in one forward and replay it in another.

    >>> rr = RouterReplay(model)
    >>> with rr.record():
    ...     model(batch)                 # e.g. the rollout
    >>> ids = rr.export()               # {"layers.0.mlp": int32 [T, K], ...}
    >>> with RouterReplay(trainer_model).replay(ids):
    ...     loss = trainer_model(batch)  # routes exactly as recorded
    >>> loss.backward()                 # checkpoint recomputation replays the same ids
    """

    def __init__(self, model: nn.Module | None = None, *, prefix: str = ""):
        self._layers: dict[str, nn.Module] = {}
        self._handles: list = []
        self.mode: str | None = None
        self._records: dict[str, torch.Tensor] = {}
        self._targets: dict[str, torch.Tensor] = {}
        self._static: dict[str, torch.Tensor] | None = None
        self._natural = _Session()                 # forwards outside sessions, and recorded ones
        self._session: _Session | None = None      # the active session
        self._live = weakref.WeakSet()             # replay sessions whose tagged graphs may still exist
        # makes the tag reach the autograd graph when a trainable layer's input needs no grad
        self._anchor = torch.zeros((), requires_grad=True)
        if model is not None:
            self.attach(model, prefix=prefix)

    # ------------------------------------------------------------------ attaching

    def attach(self, model: nn.Module, prefix: str = "") -> "RouterReplay":
        """Hook every routing layer of ``model`` (outermost only: a Router inside an MoE is driven by
        the MoE) under its qualified name, ``prefix`` prepended (the root itself is named ``prefix`` or
        ``"root"``)."""
        found = []
        for name, mod in model.named_modules(prefix=prefix):
            if not getattr(mod, "_mojo_routing_layer", False):
                continue
            name = name or "root"
            if any(name.startswith(outer + ".") for outer in found):
                continue
            if name in self._layers:
                raise ValueError(f"RouterReplay: a layer named {name!r} is already attached")
            found.append(name)
            self._layers[name] = mod
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post_hook(name), with_kwargs=True))
        if not found:
            raise ValueError(f"RouterReplay: {type(model).__name__} holds no routing layer (mo.MoE, mo.Router or a "
                             "module with _mojo_routing_layer = True)")
        return self

    def detach(self) -> None:
        """Remove the hooks; the layers route naturally again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._layers.clear()
        self.mode = None
        self._session = None

    @property
    def layer_names(self) -> list[str]:
        """The attached layers' names, in model order."""
        return list(self._layers)

    # ------------------------------------------------------------------ sessions

    @contextlib.contextmanager
    def record(self, *, clear_pending: bool = True) -> Iterator["RouterReplay"]:
        """Record the routing of the forwards run inside the block (each layer once)."""
        self.start_record(clear_pending=clear_pending)
        try:
            yield self
        finally:
            self.stop()

    @contextlib.contextmanager
    def replay(self, ids=None, names: Sequence[str] | None = None, *, strict: bool = True,
               clear_pending: bool = True) -> Iterator["RouterReplay"]:
        """Replay ``ids`` (see :meth:`load`; None: what was last loaded or recorded) in the block.

        ``clear_pending`` is accepted for compatibility and has no effect: the ids of a forward that
        still awaits its backward live in that forward's autograd graph, not in a queue."""
        self.start_replay(ids, names, strict=strict, clear_pending=clear_pending)
        try:
            yield self
        finally:
            self.stop()

    def start_record(self, *, clear_pending: bool = True) -> None:
        """Imperative form of :meth:`record` (end it with :meth:`stop`)."""
        self._begin()
        self._records = {}
        self.mode = "record"
        self._session = self._natural

    def start_replay(self, ids=None, names: Sequence[str] | None = None, *, strict: bool = True,
                     clear_pending: bool = True) -> None:
        """Imperative form of :meth:`replay` (end it with :meth:`stop`)."""
        self._begin()
        if ids is not None:
            self.load(ids, names, strict=strict)
        elif not self._targets:
            if not self._records:
                raise RuntimeError("RouterReplay.replay: no ids given and nothing loaded or recorded")
            self._targets = dict(self._records)
        self.mode = "replay"
        self._session = _Session(dict(self._targets))

    def stop(self) -> None:
        """End the session.  Forwards run in it that still await their backward keep their ids."""
        self.mode = None
        self._session = None

    def clear(self) -> None:
        """Forget recorded and loaded ids (static buffers stay allocated; forwards awaiting their
        backward keep theirs)."""
        self._records, self._targets = {}, {}

    def _begin(self) -> None:
        if not self._layers:
            raise RuntimeError("RouterReplay: attach a model first")
        if self.mode is not None:
            raise RuntimeError(f"RouterReplay: a {self.mode} session is already active; stop() it first")

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            compiling = torch.compiler.is_compiling()
            if compiling:
                # a traced graph has no autograd nodes to tag; checkpointing inside it is the compiler's
                session = self._session or self._natural
            elif in_backward():
                session = self._recomputed_session(name)
            else:
                session = self._session or self._natural
                if session.targets is not None and kwargs.get("forced_expert_ids") is not None:
                    raise RuntimeError(f"RouterReplay: layer {name!r} got forced_expert_ids while replaying")
            ids = None if session.targets is None else self._target(session, name, module, args, kwargs)
            if not compiling:
                args, kwargs = self._tag(session, module, args, kwargs)
            if ids is None:
                return args, kwargs
            return args, {**kwargs, "forced_expert_ids": ids}
        return hook

    def _tag(self, session: _Session, module, args, kwargs):
        """Attach ``session`` to this forward so that its recomputation finds it (see the module doc)."""
        if not torch.is_grad_enabled():
            # no graph is built: only a Function running this forward (reentrant checkpointing) can
            # recompute it; a plain no-grad forward is never recomputed and leaves nothing behind
            for ctx in _function_forward_contexts():
                d = getattr(ctx, "_mojo_routing", None)
                if d is None:
                    ctx._mojo_routing = d = {}
                d[self] = session
                self._note(session)
            return args, kwargs
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return args, kwargs
        anchor = None
        if not x.requires_grad:
            if not any(p.requires_grad for p in module.parameters()):
                return args, kwargs     # nothing to differentiate: no backward, no recomputation
            # the layer's nodes would hang off its parameters only, out of reach of the tag
            anchor = self._anchor
        x = _Tag.apply(x, anchor, {self: session})
        self._note(session)
        if args:
            return (x,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "x": x}

    def _note(self, session: _Session) -> None:
        if session.targets is not None:
            self._live.add(session)   # weakly: gone with the last graph that holds its tag

    def _recomputed_session(self, name: str) -> _Session:
        """The session of the forward being recomputed: the tag nearest upstream of the backward
        node being executed (a checkpointed forward's own node, or the node whose saved activation
        triggered the recomputation)."""
        node = _current_node()
        if node is not None:
            seen, todo = {node}, deque([node])
            while todo:
                n = todo.popleft()
                tags = getattr(n, "_mojo_routing", None)
                if tags is not None and self in tags:
                    return tags[self]
                for nxt, _ in n.next_functions:
                    if nxt is not None and nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
        # a forward run inside backward that is not a recomputation of a tagged forward
        current = self._session or self._natural
        others = [s for s in self._live if s is not current]
        if others:
            raise RuntimeError(
                f"RouterReplay: layer {name!r} runs inside backward (an activation recomputation?) but the "
                f"forward it recomputes carries no routing tag, while {len(others)} replayed forward(s) may still "
                "await their backward: its ids cannot be told apart.  Run the layer's forward while this "
                "RouterReplay is attached, with autograd on (or inside the checkpoint's autograd.Function)")
        return current

    def _post_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if self.mode != "record" or in_backward():
                return None
            if name in self._records:
                raise RuntimeError(f"RouterReplay: layer {name!r} routed twice in one recording; record each "
                                   "forward in its own session (ids are keyed by layer name, never by call order)")
            ids = module.last_topk_ids
            if self._static is not None:
                buf = self._static.get(name)
                if buf is None:
                    raise RuntimeError(f"RouterReplay: no static buffer for layer {name!r}; call allocate_static() "
                                       "after attaching every model")
                if buf.shape != ids.shape:
                    raise RuntimeError(f"RouterReplay: layer {name!r} routed {list(ids.shape)} ids but its static "
                                       f"buffer is {list(buf.shape)} (sizes are fixed at allocation / capture)")
                buf.copy_(ids)
                ids = buf
            self._records[name] = ids
            return None
        return hook

    def _target(self, session: _Session, name: str, module, args, kwargs) -> torch.Tensor:
        ids = session.targets.get(name)
        if ids is None:
            have = ", ".join(sorted(session.targets)) or "none"
            raise KeyError(f"RouterReplay: no replay ids for layer {name!r} (ids are keyed by module name; "
                           f"loaded: {have})")
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor):
            T, K = _tokens(x), getattr(module, "top_k", ids.shape[-1])
            if ids.dim() != 2 or tuple(ids.shape) != (T, K):
                raise ValueError(f"RouterReplay: layer {name!r} routes {T} tokens to top_k={K} experts but its "
                                 f"replay ids have shape {list(ids.shape)}")
            if ids.device != x.device:
                ids = ids.to(x.device)
                session.targets[name] = ids   # move once, not every forward
        return ids

    # ------------------------------------------------------------------ static buffers (CUDA graphs)

    def allocate_static(self, num_tokens: int, device=None) -> dict[str, torch.Tensor]:
        """Preallocate one int32 ``[num_tokens, top_k]`` buffer per layer (on the layer's device, or
        ``device``); recording then copies into them instead of keeping new tensors, which is what a
        CUDA graph needs (capture with the same token count).  Returns ``{name: buffer}``."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        bufs = {}
        for name, mod in self._layers.items():
            dev = device
            if dev is None:
                p = next(mod.parameters(), None)
                dev = p.device if p is not None else "cpu"
            bufs[name] = torch.zeros(num_tokens, int(mod.top_k), dtype=torch.int32, device=dev)
        self._static = bufs
        return dict(bufs)

    def release_static(self) -> None:
        self._static = None

    @property
    def static_buffers(self) -> dict[str, torch.Tensor] | None:
        return None if self._static is None else dict(self._static)

    # ------------------------------------------------------------------ export / import

    def recorded(self) -> dict[str, torch.Tensor]:
        """The last recording, ``{name: ids}``, without copies (static buffers themselves in static mode)."""
        return {n: self._records[n] for n in self._layers if n in self._records}

    def export(self) -> dict[str, torch.Tensor]:
        """A copy of the last recording: ``{layer name: int32 [T, K]}`` in model order."""
        if not self._records:
            raise RuntimeError("RouterReplay.export: nothing recorded")
        return {n: t.detach().to(torch.int32).clone() for n, t in self.recorded().items()}

    def export_stacked(self) -> tuple[torch.Tensor, list[str]]:
        """The last recording as one int32 ``[L, T, K]`` tensor and its L layer names (all layers must
        route the same T and K)."""
        rec = self.export()
        shapes = {tuple(t.shape) for t in rec.values()}
        if len(shapes) != 1:
            raise ValueError(f"RouterReplay.export_stacked: layers routed different shapes {sorted(shapes)}; "
                             "use export()")
        return torch.stack(list(rec.values())), list(rec)

    @staticmethod
    def unstack(stacked: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``[L, T, K]`` + L names -> ``{name: [T, K]}``."""
        if not isinstance(stacked, torch.Tensor) or stacked.dim() != 3:
            raise ValueError(f"stacked ids must be a tensor of shape [L, T, K], got "
                             f"{list(stacked.shape) if isinstance(stacked, torch.Tensor) else type(stacked).__name__}")
        names = list(names)
        if len(names) != stacked.shape[0] or len(set(names)) != len(names):
            raise ValueError(f"names must hold {stacked.shape[0]} distinct layer names, got {names}")
        return {n: stacked[i] for i, n in enumerate(names)}

    def load(self, ids, names: Sequence[str] | None = None, *, strict: bool = True) -> None:
        """Set the ids to replay: ``{name: [T, K]}`` or a stacked ``[L, T, K]`` tensor with ``names``.

        ``strict``: a name that matches no attached layer is an error (it usually means the two models
        name their layers differently); rename the keys first.  Values are checked when used."""
        if isinstance(ids, torch.Tensor):
            if names is None:
                raise ValueError("load: a stacked [L, T, K] tensor needs the layer names")
            ids = self.unstack(ids, names)
        if not isinstance(ids, Mapping):
            raise TypeError(f"load: ids must be a dict of tensors or a stacked tensor, got {type(ids).__name__}")
        for n, t in ids.items():
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"load: ids[{n!r}] must be an integer tensor")
        unknown = [n for n in ids if n not in self._layers]
        if strict and unknown:
            raise KeyError(f"RouterReplay.load: no attached layer is named {unknown}; attached: {self.layer_names}")
        self._targets = dict(ids)
        if self.mode == "replay":
            # a new session: forwards already run keep the ids they routed with
            self._session = _Session(dict(self._targets))
