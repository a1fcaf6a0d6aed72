"""FedAvg for LoRA adapters that survives restarts, late or dead clients and bad updates.

Flower's ``FedAvg`` samples clients and builds the messages; this subclass changes what Flower does not
have: every update is checked before it is averaged (names, shapes, dtypes, finite values, norm against the
cohort), a round closes at its deadline with whoever replied, and the loop starts from a saved
:class:`~fedge.server.state.ServerState` and saves one after every round.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.common import wire
from fedge.common.lora import A_SUFFIX, client_rank, for_client
from fedge.server import aggregate, hetero, robust
from fedge.server.records import PRIOR_FAILURE, ClientRound, Failure, RoundRecord
from fedge.server.settings import ServerSettings
from fedge.server.state import ServerState

log = logging.getLogger("fedge.server")


class FedgeAvg(FedAvg):
    """Example-weighted FedAvg of LoRA tensors with update validation, deadlines and resumable rounds."""

    def __init__(self, server: ServerSettings, stage_deadline_s: float) -> None:
        super().__init__(
            min_train_nodes=server.min_clients,
            min_evaluate_nodes=server.min_clients,
            min_available_nodes=server.min_clients,
            weighted_by_key=wire.Metric.EXAMPLES,
            arrayrecord_key=wire.ADAPTER,
            configrecord_key=wire.CONFIG,
        )
        self.server, self.stage_deadline_s = server, stage_deadline_s
        self._names: dict[int, str] = {}  # node id -> client name, from replies: names the failures

    def run(
        self,
        grid: Grid,
        state: ServerState,
        num_rounds: int,
        train_config: dict,
        evaluate_config: dict,
        save: Callable[[ServerState], None],
    ) -> ServerState:
        """Run rounds ``state.round + 1 .. num_rounds``; round 0 evaluates the initial adapter. Saves each round.

        With ``eval_in_train`` a round's train message asks the clients to score the adapter they receive before
        training on it (`wire.Cfg.SCORE_FIRST`): round r's record gets its evaluation from round r + 1's replies,
        and only the last round has an evaluate stage of its own.
        """
        fused = self.server.eval_in_train
        if state.round == 0 and not state.records and fused:
            state.records.append(RoundRecord(0))  # scored by round 1's train replies
            save(state)
        elif state.round == 0 and not state.records:
            t0 = time.monotonic()
            messages, _ = self._messages(self.configure_evaluate, 0, state, evaluate_config, grid)
            evals, failures = self._stage(grid, messages, state=state)
            self._ask_back(state, failures)
            evaluated, bad = self._evaluations(evals, wire.RoundSettings.from_config(evaluate_config))
            state.records.append(RoundRecord.summarize(0, [], evaluated, failures + bad, time.monotonic() - t0))
            save(state)
        for rnd in range(state.round + 1, num_rounds + 1):
            t0 = time.monotonic()
            deferred = self._wait_for_eligible(grid, state)
            last = state.records[-1] if state.records else None
            score_prev = fused and self._scores(rnd - 1, num_rounds) and last is not None and last.round == rnd - 1
            score_prev = score_prev and last.exact_match is None and last.heldout_loss is None
            config = {**train_config, wire.Cfg.SCORE_FIRST: 1} if score_prev else train_config
            messages, bytes_down = self._messages(self.configure_train, rnd, state, config, grid)
            replies, train_failures = self._stage(grid, messages, deferred, state)
            deferred |= self._ask_back(state, train_failures)
            if score_prev:  # the previous round's global adapter, scored by this round's clients before training
                prior, bad = self._evaluations(replies, wire.RoundSettings.from_config(evaluate_config), prior=True)
                state.records[-1] = state.records[-1].with_evaluations(prior, bad)
            clients = self._check_and_average(state, replies, bytes_down, wire.RoundSettings.from_config(train_config))
            evals, eval_failures = [], []
            if (not fused and self._scores(rnd, num_rounds)) or rnd == num_rounds:
                messages, _ = self._messages(self.configure_evaluate, rnd, state, evaluate_config, grid)
                evals, eval_failures = self._stage(grid, messages, deferred, state)
            self._ask_back(state, eval_failures)
            state.round = rnd
            evaluated, bad = self._evaluations(evals, wire.RoundSettings.from_config(evaluate_config))
            failures = train_failures + eval_failures + bad
            skipped = len(deferred - {f.node_id for f in failures})
            state.records.append(
                RoundRecord.summarize(rnd, clients, evaluated, failures, time.monotonic() - t0, skipped)
            )
            save(state)
        return state

    def _scores(self, rnd: int, num_rounds: int) -> bool:
        """Whether round ``rnd``'s global adapter is scored: round 0, every ``eval_every``-th, and the last."""
        return rnd % self.server.eval_every == 0 or rnd == num_rounds

    # --- retry windows: a client that declined is asked again after --retry-after seconds ---------------------

    def _ask_back(self, state: ServerState, failures: list[Failure]) -> set[int]:
        """Give each node that declined its window (kept in the strategy state: it survives a restart); the nodes
        given one."""
        if not self.server.retry_after:
            return set()
        retry_at = state.strategy.setdefault("retry_at", {})
        nodes = set()
        for f in failures:
            if f.declined and f.node_id is not None:
                f.retry_after_s = self.server.retry_after
                retry_at[str(f.node_id)] = time.time() + self.server.retry_after
                nodes.add(f.node_id)
        return nodes

    def _deferred(self, state: ServerState) -> dict[int, float]:
        """Nodes whose window is still open: {node: unix time it closes}; closed (or unreadable) windows dropped."""
        retry_at, now, open_ = state.strategy.get("retry_at") or {}, time.time(), {}
        for node, until in list(retry_at.items()):
            if isinstance(until, (int, float)) and until > now and node.isdigit():
                open_[int(node)] = until
            else:
                del retry_at[node]
        return open_

    def _wait_for_eligible(self, grid: Grid, state: ServerState) -> set[int]:
        """The nodes to leave out of this round. While every connected node is in its window, the round waits
        (checking each second) rather than running empty: the first window to close, or a new node, starts it."""
        said = False
        while True:
            deferred = self._deferred(state)
            if not deferred or set(grid.get_node_ids()) - set(deferred):
                return set(deferred)
            if not said:
                wait = min(deferred.values()) - time.time()
                log.info("every client is asked to come back later: the round starts in at most %.0f s", wait)
                said = True
            time.sleep(min(1.0, max(0.0, min(deferred.values()) - time.time())))

    # --- LoRA A goes to a node once: with A frozen it never changes (fedge.edge_client.federation.frozen_a) ---

    def _messages(
        self, configure: Callable, rnd: int, state: ServerState, config: dict, grid: Grid
    ) -> tuple[list[Message], dict[int, int]]:
        """A stage's messages, by Flower's ``configure_train`` or ``configure_evaluate``, and the bytes each node is
        sent. With LoRA A frozen, the nodes that hold it (`_holders`) get B and A's fingerprint only."""
        full = wire.to_record(state.arrays)
        sizes = defaultdict(lambda: wire.record_bytes(full))  # node -> bytes it is sent
        a = {k: v for k, v in state.arrays.items() if k.endswith(A_SUFFIX)}
        if not (wire.RoundSettings.from_config(config).lora_freeze_a and a):
            return list(configure(rnd, full, ConfigRecord(config), grid)), sizes
        digest = wire.fingerprint(a)
        lean = wire.to_record({k: v for k, v in state.arrays.items() if not k.endswith(A_SUFFIX)})
        holders = self._holders(state, digest, set(grid.get_node_ids()))
        messages = []
        for m in configure(rnd, lean, ConfigRecord({**config, wire.Cfg.LORA_A: digest}), grid):
            node = m.metadata.dst_node_id
            if node not in holders:  # Flower's messages share one content: this node's gets its own, with A
                content = RecordDict({wire.ADAPTER: full, wire.CONFIG: m.content[wire.CONFIG]})
                m = Message(content=content, dst_node_id=node, message_type=m.metadata.message_type)
            messages.append(m)
            sizes[node] = wire.record_bytes(m.content[wire.ADAPTER])
        return messages, sizes

    @staticmethod
    def _holders(state: ServerState, digest: str, connected: set[int]) -> set[int]:
        """The connected nodes known to hold the LoRA A with this fingerprint (kept in the strategy state; a new
        fingerprint starts afresh, and nodes gone from the grid are dropped: each rejoin is a new node id)."""
        held = state.strategy.get("lora_a")
        if not isinstance(held, dict) or held.get("digest") != digest or not isinstance(held.get("nodes"), list):
            held = state.strategy["lora_a"] = {"digest": digest, "nodes": []}
        held["nodes"] = sorted(n for n in held["nodes"] if isinstance(n, int) and n in connected)
        return set(held["nodes"])

    @staticmethod
    def _learn_holders(state: ServerState, replies: list[Message], failures: list[Failure]) -> None:
        """After a stage: a node whose reply names the current A (`wire.Client.LORA_A`: it kept it) holds it; one
        whose reply does not (it could not keep it), or that failed for want of it (`wire.LORA_A_MISSING`), is sent A
        next time. Other failures say nothing either way."""
        held = state.strategy.get("lora_a")
        if not isinstance(held, dict) or not isinstance(held.get("nodes"), list):
            return
        nodes = {n for n in held["nodes"] if isinstance(n, int)}
        for reply in replies:
            node = reply.metadata.src_node_id
            if _reply_lora_a(reply) == held.get("digest"):
                nodes.add(node)
            else:
                nodes.discard(node)
        nodes -= {f.node_id for f in failures if wire.LORA_A_MISSING in f.reason}
        held["nodes"] = sorted(nodes)

    def _stage(
        self, grid: Grid, messages: Iterable[Message], skip: set[int] = frozenset(), state: ServerState | None = None
    ) -> tuple[list[Message], list[Failure]]:
        """Send (not to the nodes in ``skip``), then collect replies until all are in or the deadline passes:
        (good replies, failures). With ``state``, learn from them which nodes hold LoRA A (`_learn_holders`).

        A failure names its node and, once the node has replied in this run, its client.
        """
        sent = [m for m in messages if m.metadata.dst_node_id not in skip]
        pending = set(grid.push_messages(sent))
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}  # push filled in the ids
        end = time.monotonic() + self.stage_deadline_s
        replies, failures = [], []
        while pending and time.monotonic() < end:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id
                if reply.has_error():
                    failure = Failure.from_error(node, self._names.get(node), str(reply.error.reason))
                    failures.append(failure)
                    if failure.declined:
                        log.info("node %s declined: %s", node, failure.reason)
                    else:
                        log.warning("node %s failed: %s", node, failure.reason)
                else:
                    name = _reply_name(reply)
                    if name is not None:
                        self._names[node] = name
                    replies.append(reply)
            time.sleep(0.5)
        failures += [self._failure(to_node.get(mid), "no reply before the deadline") for mid in pending]
        if state is not None:
            self._learn_holders(state, replies, failures)
        return replies, failures

    def _failure(self, node: int | None, reason: str) -> Failure:
        return Failure(node, self._names.get(node) if node is not None else None, reason)

    def _check_and_average(
        self, state: ServerState, replies: list[Message], bytes_down: dict[int, int], settings: wire.RoundSettings
    ) -> list[ClientRound]:
        """Validate each update against the global adapter and merge the accepted ones into ``state``;
        ``bytes_down``: what each node was sent."""
        clients, updates = [], []
        for reply in replies:
            entry, update = self._check_reply(reply, state, settings)
            entry.bytes_down = bytes_down[reply.metadata.src_node_id]
            clients.append(entry)
            updates.append(update)
        self._judge_sizes(state, clients, updates)
        accepted = [i for i, c in enumerate(clients) if c.reason is None]
        for c in clients:
            c.accepted = c.reason is None
            if not c.accepted:
                log.warning("rejected the update of %s: %s", c.name, c.reason)
        if len(accepted) >= self.server.min_clients:
            self._merge(state, [clients[i] for i in accepted], [updates[i] for i in accepted], settings)
        elif clients:
            log.warning(
                "only %d acceptable updates (minimum %d): the global adapter stays as it was",
                len(accepted),
                self.server.min_clients,
            )
        return clients

    def _judge_sizes(self, state: ServerState, clients: list[ClientRound], updates: list[dict]) -> None:
        """Reject the changes that are too large: above the absolute bound (a sole or first replier too), or far
        above the others' (identical updates count once among the others, and never below ``norm_floor``)."""
        for c in clients:
            if c.reason is None and c.delta_rms > self.server.max_change_rms:
                c.reason = (
                    f"update norm {c.delta_rms:.3g} (RMS per changed entry) is above the absolute bound "
                    f"{self.server.max_change_rms:g}"
                )
        checked = [i for i, c in enumerate(clients) if c.reason is None]
        outliers = aggregate.norm_outliers(
            [clients[i].delta_rms for i in checked],
            state.strategy.get("accepted_norms", [])[-20:],
            self.server.norm_factor,
            floor=self.server.norm_floor,
            keys=[aggregate.digest(updates[i]) for i in checked],
        )
        for i, is_outlier in zip(checked, outliers):
            if is_outlier:
                clients[i].reason = (
                    f"update norm {clients[i].delta_rms:.3g} (RMS per changed entry) is more than "
                    f"{self.server.norm_factor:g}x the cohort's"
                )

    def _merge(
        self, state: ServerState, clients: list[ClientRound], updates: list[dict], settings: wire.RoundSettings
    ) -> None:
        """Clip, then merge the accepted updates into the global adapter (mixed ranks and layer subsets merge per
        tensor; step-normalized weights even out unequal step counts; no client above its capped share)."""
        server = self.server
        scales = robust.clip_scales([c.delta_rms for c in clients], server.clip_rms, server.clip_factor)
        for i, (c, scale) in enumerate(zip(clients, scales)):
            if scale < 1:
                c.clip_scale = round(scale, 6)
                start = for_client(state.arrays, client_rank(updates[i]), settings.lora_alpha, settings.lora_merge)
                updates[i] = {k: (start[k] + scale * (v - start[k])).astype(v.dtype) for k, v in updates[i].items()}
        examples = [c.examples_counted or c.examples for c in clients]
        steps = [int(c.steps or 1) for c in clients]
        state.arrays = hetero.aggregate(
            state.arrays, updates, examples, settings.lora_alpha, method=settings.lora_merge, steps=steps,
            server_lr=server.server_lr, max_share=server.max_share, rule=server.aggregation, trim=server.trim,
            krum_f=server.krum_f,
        )  # fmt: skip
        if server.aggregation == "mean":  # the other rules weigh clients equally per coordinate or select them
            shares = robust.cap_shares(hetero.fednova_coefficients(examples, steps), server.max_share)
            for c, share in zip(clients, shares):
                c.share = round(share, 6)
        history = state.strategy.get("accepted_norms", [])[-20:]
        state.strategy["accepted_norms"] = history + [c.delta_rms for c in clients]
        declared = state.strategy.setdefault("declared_examples", {})
        for c in clients:
            key = str(c.node_id)
            declared[key] = max(float(declared.get(key, 0)), c.examples_counted or c.examples)

    def _evaluations(
        self, replies: list[Message], settings: wire.RoundSettings, prior: bool = False
    ) -> tuple[list[ClientRound], list[Failure]]:
        """The evaluation replies' entries, and a failure for each one whose records are not what they must be.

        ``prior``: the evaluations of the received adapter that train replies carry (`wire.Cfg.SCORE_FIRST`); a
        reply without one is a failure of the evaluation too (its update is judged on its own).
        """
        what = PRIOR_FAILURE if prior else "bad evaluation reply"
        entries, failures = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                entry = client_round(reply, evaluation=True, prior=prior)
                _check_evaluation(entry, settings)
                entries.append(entry)
            except Exception as err:  # noqa: BLE001 (a bad report is that client's failure, not the round's)
                if not isinstance(err, ValueError):
                    log.exception("could not handle the evaluation of node %s", node)
                failures.append(Failure(node, self._names.get(node) or _reply_name(reply), f"{what}: {str(err)[:300]}"))
        return entries, failures

    def _count_examples(self, entry: ClientRound, state: ServerState) -> None:
        """The examples this reply is weighted by: its claim, but at most ``examples_growth`` x the most its node
        was counted for before (a node's claims grow by at most that much a round; a first claim is bounded by the
        share cap). Keyed by the node, which the SuperLink assigns: a client naming itself after another cannot
        change what that one is counted for."""
        before = state.strategy.get("declared_examples", {}).get(str(entry.node_id))
        entry.examples_counted = entry.examples
        if before and entry.examples > self.server.examples_growth * before:
            entry.examples_counted = self.server.examples_growth * before
            entry.flags.append(
                f"claims {entry.examples:g} training examples, counted as {entry.examples_counted:g}: at most "
                f"{self.server.examples_growth:g}x the {before:g} it was counted for before (examples_growth)"
            )

    def _check_reply(
        self, reply: Message, state: ServerState, settings: wire.RoundSettings
    ) -> tuple[ClientRound, dict]:
        """(the client's entry, its update at its own rank; {} when rejected, with the reason in the entry).

        Every part of the reply is hostile until checked: the records' types and sizes (`ClientRound.from_reply`),
        the weight it claims (examples, steps: at most what the server asked for), then the update itself
        (`hetero.from_reply`). Any other exception while handling it rejects this reply, logged with its
        traceback, and never ends the round: the client would resend it on every resume.
        """
        node = reply.metadata.src_node_id
        entry = ClientRound(name=self._names.get(node, f"node {node}"), node_id=node)
        try:
            entry = client_round(reply)
            entry.flags = _implausible(entry, settings)
            entry.reason = _claims(entry, settings)
            if entry.reason is not None:
                return entry, {}
            self._count_examples(entry, state)
            received = wire.read_record(reply.content[wire.ADAPTER], _max_reply_bytes(state.arrays))
            entry.bytes_up = wire.record_bytes(reply.content[wire.ADAPTER])
            update, entry.delta_rms = hetero.from_reply(
                received, state.arrays, settings.lora_alpha, settings.lora_merge
            )
            frozen = _frozen_changed(update, state.arrays, settings)
            if frozen:
                entry.reason = f"changed {frozen[0]}, which this round freezes (lora_freeze_a)"
                return entry, {}
            return entry, update
        except ValueError as err:  # names, shapes, types, finite values: the check's own words
            entry.reason = str(err)[:500]
        except Exception as err:  # noqa: BLE001 (one reply must not end the round; see the docstring)
            log.exception("could not handle the reply of node %s", node)
            entry.reason = f"malformed reply ({type(err).__name__}: {str(err)[:200]})"
        return entry, {}


MAX_EXAMPLES = 10_000_000  # a device's training examples; a claim above is a lie (it would outweigh everyone)


def _max_reply_bytes(global_arrays: dict) -> int:
    """The most an update may weigh: the whole fp32 adapter, a codec header and the .npy headers."""
    return sum(a.nbytes for a in global_arrays.values()) + (1 << 20) + 256 * len(global_arrays)


def _frozen_changed(update: dict, global_arrays: dict, settings: wire.RoundSettings) -> list[str]:
    """The LoRA A tensors an update changed although the round froze them (FFA-LoRA: A is shared and fixed)."""
    a_keys = [k for k in update if k.endswith(A_SUFFIX)]
    if not settings.lora_freeze_a or not a_keys:
        return []
    rank = client_rank(update)
    full = rank == client_rank(global_arrays)
    start = global_arrays if full else for_client(global_arrays, rank, settings.lora_alpha, settings.lora_merge)
    return [k for k in a_keys if not np.allclose(update[k], start[k], rtol=1e-6, atol=1e-7)]


MAX_LOSS = 100.0  # nats per token: a random-init model over a 1M-token vocabulary scores ~14


def _check_evaluation(entry: ClientRound, settings: wire.RoundSettings) -> None:
    """ValueError if an evaluation reports the impossible (it would skew the round's weighted figures): more
    examples than the round asked each client to score, a fraction outside [0, 1], a loss no model has."""
    if entry.exact_match is not None and not 0 <= entry.exact_match <= 1:
        raise ValueError(f"exact-match {entry.exact_match} is not a fraction in [0, 1]")
    if entry.heldout_loss is not None and not 0 <= entry.heldout_loss <= MAX_LOSS:
        raise ValueError(f"heldout-loss {entry.heldout_loss} is not in 0..{MAX_LOSS:g}")
    n = entry.eval_examples
    if n is not None and (not 0 <= n <= settings.eval_examples or n != int(n)):
        raise ValueError(f"eval-examples {n} is not a whole number in 0..{settings.eval_examples} (the round's)")


def _reply_lora_a(reply: Message) -> str | None:
    """The fingerprint of the LoRA A a reply says its node holds, if it names one."""
    try:
        value = reply.content[wire.CLIENT].get(wire.Client.LORA_A) if wire.CLIENT in reply.content else None
    except Exception:  # noqa: BLE001 (a record of the wrong kind: it holds nothing we know of)
        return None
    return value if isinstance(value, str) else None


def _reply_name(reply: Message) -> str | None:
    """The client's name in a reply, if it sent a usable one (it names the client in later failures)."""
    try:
        name = reply.content[wire.CLIENT].get(wire.Client.NAME) if wire.CLIENT in reply.content else None
    except Exception:  # noqa: BLE001 (a record of the wrong kind: no name, not an outage)
        return None
    return name if isinstance(name, str) and 0 < len(name) <= 128 else None


def _claims(entry: ClientRound, settings: wire.RoundSettings) -> str | None:
    """Why the weight a training reply claims cannot be believed (None if it can): examples are what FedAvg
    weights by, steps what FedNova divides by, so both must be whole, positive and no more than possible."""
    if not 1 <= entry.examples <= MAX_EXAMPLES or entry.examples != int(entry.examples):
        return f"claims {entry.examples:g} training examples: expected a whole number in 1..{MAX_EXAMPLES}"
    most = settings.steps * settings.batch  # a device that shrank its batch may train the round's examples in more
    if entry.steps is None or not 1 <= entry.steps <= most or entry.steps != int(entry.steps):
        return f"claims {entry.steps} local steps: expected a whole number in 1..{most} (the round's steps x batch)"
    return None


def _implausible(entry: ClientRound, settings: wire.RoundSettings) -> list[str]:
    """Reported figures that cannot be true (kept in the record and flagged; nothing is weighted by them)."""
    flags = [
        f"{name} {getattr(entry, name):g} is negative"
        for name in ("tokens", "train_seconds", "peak_rss_mb", "energy_j", "upload_bytes", "round_seconds")
        if (getattr(entry, name) or 0) < 0
    ]
    plan = entry.plan or {}  # already a valid TrainingPlan
    batch = max(settings.batch, plan.get("micro_batch", 0) * plan.get("grad_accum", 0))
    most = settings.steps * batch * max(settings.seq_len, plan.get("seq_len", 0))
    if entry.tokens is not None and entry.tokens > most:
        flags.append(f"tokens {entry.tokens:g} is more than {most} (steps x batch x sequence length)")
    if entry.train_loss is not None and not 0 <= entry.train_loss <= 1e3:
        flags.append(f"train loss {entry.train_loss:g} is outside 0..1000")
    return flags


def client_round(reply: Message, evaluation: bool = False, prior: bool = False) -> ClientRound:
    """The per-client part of a round record, from a train or (``evaluation``) evaluate reply; with ``prior`` the
    evaluation a train reply carries (ValueError if it carries none)."""
    content = reply.content
    info = dict(content[wire.CLIENT]) if wire.CLIENT in content else {}
    metrics = dict(content[wire.METRICS]) if wire.METRICS in content else {}
    if not prior:
        return ClientRound.from_reply(reply.metadata.src_node_id, info, metrics, evaluation)
    entry = ClientRound.prior_evaluation(reply.metadata.src_node_id, info, metrics)
    if entry is None:
        raise ValueError("the train reply carries no evaluation of the adapter it was sent")
    return entry
