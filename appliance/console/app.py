"""The admin console: what serves, how fast, how well; roll back, freeze, or promote or
abort a rollout in a keystroke.

Data comes from `state.load_snapshot` in a thread worker every two seconds (the UI thread
never touches SQLite); actions go through `state.ConsoleActions`, behind a confirmation
dialog that says what will change and asks for a reason, and end in a notification.
Errors (a locked database, the service down, a frozen store) are notifications.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.markup import escape
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)

from appliance.console.state import ConsoleActions, Snapshot
from appliance.errors import ApplianceError
from appliance.evals.report import verdict_word
from appliance.evals.stats import wilson_interval
from appliance.telemetry.queries import RetrievalStats

REFRESH_SECONDS = 2.0


class ConfirmAction(ModalScreen[str | None]):
    """Shows what will change; returns the reason typed, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, change: str, reason_required: bool) -> None:
        super().__init__()
        self.title_text, self.change, self.reason_required = title, change, reason_required

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="dialog-title")
            yield Static(self.change, id="dialog-change")
            yield Input(placeholder="reason (recorded in the audit log)", id="reason")
            with Horizontal(id="dialog-buttons"):
                yield Button("Confirm", variant="error", id="confirm")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "confirm":
            self._confirm()
        else:
            self.dismiss(None)

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self._confirm()

    def _confirm(self) -> None:
        reason = self.query_one("#reason", Input).value.strip()
        if self.reason_required and not reason:
            self.notify("a reason is required", severity="warning")
            return
        self.dismiss(reason)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConsoleApp(App[None]):
    TITLE = "Custom SLM Appliance"
    CSS = """
    #dialog { width: 64; height: auto; padding: 1 2; border: thick $error; background: $surface; }
    #dialog-title { text-style: bold; }
    #dialog-buttons { height: auto; margin-top: 1; }
    #dialog-buttons Button { margin-right: 2; }
    ConfirmAction { align: center middle; }
    .banner { background: $error; color: $text; text-style: bold; }
    Sparkline { height: 2; margin-bottom: 1; }
    .caption { color: $text-muted; }
    DataTable { height: 1fr; }
    Tab { padding: 0 1 0 0; }
    #routes-table { height: auto; max-height: 8; }
    """
    BINDINGS = [
        # Screen keys are shown in the tab titles, so the footer fits 80 columns.
        Binding("d", "show('dashboard')", "Dashboard", show=False),
        Binding("l", "show('releases')", "Releases", show=False),
        Binding("e", "show('evals')", "Evals", show=False),
        Binding("g", "show('audit')", "Audit", show=False),
        Binding("k", "show('keys')", "Keys", show=False),
        Binding("o", "show('rollout')", "Rollout", show=False),
        Binding("t", "show('routing')", "Routing", show=False),
        Binding("s", "show('safety')", "Safety", show=False),
        Binding("b", "fallback", "Fallback", show=False),  # listed on the Routing screen
        Binding("i", "incident", "Incident"),
        Binding("p", "promote", "Promote", show=False),  # listed on the Rollout screen
        Binding("a", "activate", "Activate"),
        Binding("r", "rollback", "Roll back"),
        Binding("f", "freeze", "Freeze"),
        Binding("u", "unfreeze", "Unfreeze"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        load: Callable[[], Snapshot],
        actions: ConsoleActions | None,
        refresh_seconds: float = REFRESH_SECONDS,
    ) -> None:
        super().__init__()
        self._load, self._actions, self._refresh_seconds = load, actions, refresh_seconds
        self.snapshot: Snapshot | None = None

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="dashboard"):
            with TabPane("Dashboard (d)", id="dashboard"):
                yield Static("loading...", id="summary")
                yield Label("requests per 10 s (last 5 min)", classes="caption")
                yield Sparkline([], id="requests-spark")
                yield Label("p95 latency per 10 s", classes="caption")
                yield Sparkline([], id="p95-spark")
                yield Label("completion tokens/s", classes="caption")
                yield Sparkline([], id="tokens-spark")
            with TabPane("Releases (l)", id="releases"):
                yield Static("", id="frozen-banner")
                yield DataTable(id="releases-table", cursor_type="row")
            with TabPane("Evals (e)", id="evals"):
                yield Static("", id="evals-text")
            with TabPane("Audit (g)", id="audit"):
                yield Static("", id="audit-status")
                yield DataTable(id="audit-table", cursor_type="row")
            with TabPane("Keys (k)", id="keys"):
                yield Static("", id="keys-status")
                yield DataTable(id="keys-table", cursor_type="row")
            with TabPane("Rollout (o)", id="rollout"):
                yield Static("", id="rollout-status")
                yield DataTable(id="rollout-table", cursor_type="row")
                yield Static("", id="rollout-history")
            with TabPane("Routing (t)", id="routing"):
                yield Static("", id="routing-status")
                yield DataTable(id="targets-table", cursor_type="row")
                yield DataTable(id="routes-table", cursor_type="row")
            with TabPane("Safety (s)", id="safety"):
                yield Static("", id="safety-status")
                yield DataTable(id="guard-table", cursor_type="row")
                yield Static("", id="retrieval-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#releases-table", DataTable).add_columns(
            "release", "seq", "state", "eval", "signers", "installed"
        )
        self.query_one("#audit-table", DataTable).add_columns(
            "#", "time (UTC)", "user", "action", "target", "reason"
        )
        self.query_one("#keys-table", DataTable).add_columns("key id", "name", "status", "signed")
        self.query_one("#rollout-table", DataTable).add_columns(
            "role", "requests", "errors", "p95", "online checks (95% Wilson)", "agreement"
        )
        self.query_one("#targets-table", DataTable).add_columns(
            "#", "cold-path target", "url", "model", "per 1k tokens"
        )
        self.query_one("#routes-table", DataTable).add_columns(
            "route (5 min)", "requests", "errors", "p95", "cold cost", "escalations"
        )
        self.query_one("#guard-table", DataTable).add_columns(
            "direction", "detector", "action", "findings (5 min)"
        )
        self.refresh_data()
        self.set_interval(self._refresh_seconds, self.refresh_data)

    # -- data ------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="refresh")
    def refresh_data(self) -> None:
        try:
            snapshot = self._load()
        except Exception as exc:  # a locked or missing database: say so, keep going
            self.call_from_thread(self.notify, f"refresh failed: {exc}", severity="error")
            return
        self.call_from_thread(self.show_snapshot, snapshot)

    def show_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        try:
            self._show_dashboard(snap)
            self._show_releases(snap)
            self._show_evals(snap)
            self._show_audit(snap)
            self._show_keys(snap)
            self._show_rollout(snap)
            self._show_routing(snap)
            self._show_safety(snap)
        except NoMatches:  # the app is closing: a refresh finished after its widgets went
            return

    def _show_dashboard(self, snap: Snapshot) -> None:
        w, service = snap.window, snap.service
        served = (
            (
                f"up, serving {service.release}, queue {service.queue_depth:.0f}, "
                f"busy slots {service.busy_slots:.0f}"
            )
            if service.reachable
            else "not reachable"
        )
        frozen = f"FROZEN: {snap.frozen_reason}" if snap.frozen else "not frozen"
        routing = snap.routing
        incident = (
            f"[b reverse]INCIDENT[/] since {routing.incident_started}: "
            f"{escape(routing.incident)} (i ends it)\n"
            if routing and routing.incident
            else ""
        )
        self.query_one("#summary", Static).update(
            incident + f"[b]Active[/b] {snap.active or '-'}   ({frozen})\n"
            f"[b]Service[/b] {served}\n"
            f"[b]Last 5 min[/b] {w.requests_per_second:.2f} req/s, "
            f"{w.completion_tokens_per_second:.1f} tok/s, errors {w.error_rate:.1%}\n"
            f"[b]Latency[/b] p50 {_s(w.latency_p50)}  p95 {_s(w.latency_p95)}  "
            f"TTFT p50 {_s(w.ttft_p50)}  p95 {_s(w.ttft_p95)}\n"
            f"[b]Host[/b] CPU {snap.cpu_percent:.0f}%  memory {snap.memory_percent:.0f}%"
        )
        self.query_one("#requests-spark", Sparkline).data = list(snap.requests_series)
        self.query_one("#p95-spark", Sparkline).data = list(snap.p95_series)
        self.query_one("#tokens-spark", Sparkline).data = list(snap.tokens_series)

    def _show_releases(self, snap: Snapshot) -> None:
        banner = self.query_one("#frozen-banner", Static)
        banner.update(f"FROZEN: {snap.frozen_reason} (u unfreezes)" if snap.frozen else "")
        banner.set_class(snap.frozen, "banner")
        table = self.query_one("#releases-table", DataTable)
        row = table.cursor_row
        table.clear()
        for r in snap.releases:
            table.add_row(
                r.ref,
                str(r.sequence),
                r.state,
                r.verdict,
                ", ".join(k[:8] for k in r.signers),
                r.installed_at,
                key=r.ref,
            )
        if snap.releases:
            table.move_cursor(row=min(row, len(snap.releases) - 1))

    def _show_evals(self, snap: Snapshot) -> None:
        lines = []
        for report in snap.reports:
            verdict = verdict_word(report["gate"])
            overall, lat = report["overall"], report["latency_ms"]
            lines.append(
                f"[b]{report['release']}[/b] gate {verdict}  {overall['passed']}/"
                f"{overall['n']}  p95 {_ms(lat['p95'])}  cost/success "
                f"{_num(report['cost_per_success'])}  spec {report['spec_hash'][:12]}"
            )
            retrieval, grounded = report.get("retrieval"), report.get("groundedness")
            if retrieval or grounded:  # side by side: which moved, the passages or the answers
                parts = [f"  answers {overall['passed'] / max(overall['n'], 1):.2f} passed"]
                if retrieval:
                    parts.append(
                        f"retrieval@{retrieval['k']}: precision "
                        f"{retrieval['precision_at_k']:.2f} recall {retrieval['recall_at_k']:.2f} "
                        f"MRR {retrieval['mrr']:.2f}"
                    )
                if grounded:
                    parts.append(f"grounded {grounded['groundedness']:.2f}")
                lines.append(" | ".join(parts))
            for name, suite in report["suites"].items():
                low, high = suite["wilson_95"]
                lines.append(f"  {name:<12} {suite['pass_rate']:.2f} [{low:.2f}, {high:.2f}]")
            regression = report.get("regression")
            if regression:
                lines.append(
                    f"  vs {regression['baseline']}: {regression['difference']:+.2f}, "
                    f"McNemar p {regression['mcnemar_p']:.3f}; flipped to fail: "
                    f"{', '.join(regression['flipped_to_fail'][:6]) or 'none'}"
                )
            for failure in report["gate"]["failures"]:
                lines.append(f"  [red]FAIL {failure['criterion']}[/red]: {failure['detail']}")
            for item in report["gate"].get("inconclusive", []):
                lines.append(
                    f"  [yellow]INCONCLUSIVE {item['criterion']}[/yellow]: {item['detail']}"
                )
        self.query_one("#evals-text", Static).update("\n".join(lines) or "no eval reports yet")

    def _show_audit(self, snap: Snapshot) -> None:
        status = (
            f"hash chain intact, state matches ({len(snap.audit_rows)} rows shown, newest first)"
            if snap.audit_ok
            else f"[red]AUDIT CHECK FAILED: {escape(snap.audit_problem)}[/red]"
        )
        self.query_one("#audit-status", Static).update(status)
        table = self.query_one("#audit-table", DataTable)
        table.clear()
        for row in snap.audit_rows:
            table.add_row(
                str(row["id"]),
                row["time"][5:19].replace("T", " "),
                row["user"],
                row["action"],
                row["target"][:24],
                row["reason"] or "",
            )

    def _show_keys(self, snap: Snapshot) -> None:
        self.query_one("#keys-status", Static).update(
            f"threshold: {snap.threshold} distinct trusted key(s) per bundle"
        )
        table = self.query_one("#keys-table", DataTable)
        table.clear()
        for key in snap.keys:
            status = f"revoked {key['revoked'][:10]}" if key["revoked"] else "trusted"
            table.add_row(key["key_id"][:16], key["name"], status, ", ".join(key["signed"]) or "-")

    def _show_rollout(self, snap: Snapshot) -> None:
        rollout, status = snap.rollout, self.query_one("#rollout-status", Static)
        table = self.query_one("#rollout-table", DataTable)
        table.clear()
        if rollout is None:
            status.update("no rollout yet (appliance rollout start NAME@VERSION --canary)")
            self.query_one("#rollout-history", Static).update("")
            return
        running = rollout["state"] == "running"
        keys = "  p promotes, r aborts" if running else ""
        look = rollout["last_check"] or {}
        status.update(
            f"[b]{rollout['mode']}[/b] of {rollout['candidate']} vs {snap.active or '-'}: "
            f"{rollout['state']}, step {rollout['step'] + 1}/{len(rollout['steps'])} at "
            f"{rollout['percent']:g}%{keys}\n"
            f"latest look: {look.get('decision', '-')}"
            + (f" ({look['verdict']})" if look.get("verdict") else "")
            + f": {escape(look.get('why', ''))}"
            + _noise(look)
        )
        for role, side in look.get("sides", {}).items():
            low, high = wilson_interval(side["checked"] - side["check_failures"], side["checked"])
            agreement = side.get("agreement")
            table.add_row(
                role,
                str(side["n"]),
                f"{side['error_rate']:.1%}",
                _ms(side["p95_ms"]),
                f"{side['check_pass_rate']:.0%} [{low:.2f}, {high:.2f}]",
                "-" if agreement is None else f"{agreement:.2f}",
            )
        self.query_one("#rollout-history", Static).update(
            "\n".join(
                f"{row['time'][5:19].replace('T', ' ')}  {row['action']}"
                + (f"  ({escape(row['reason'])})" if row["reason"] else "")
                for row in snap.rollout_history
            )
        )

    def _show_routing(self, snap: Snapshot) -> None:
        routing = snap.routing
        if routing is None:
            return
        mode = (
            f"everything to the fallback ({escape(routing.fallback_reason or '')})"
            if routing.fallback
            else "by the release's policy"
        )
        incident = f"\nincident open: {escape(routing.incident)}" if routing.incident else ""
        keys = "b turns the fallback " + ("off" if routing.fallback else "on")
        keys += ", i " + ("ends the incident" if routing.incident else "starts an incident")
        status = self.query_one("#routing-status", Static)
        status.update(f"[b]Routing[/b] {mode}{incident}\n{keys}")
        targets = self.query_one("#targets-table", DataTable)
        targets.clear()
        for t in snap.targets:
            targets.add_row(str(t.position), t.name, t.url, t.model, f"{t.cost_per_1k_tokens:g}")
        prices = {f"cold:{t.name}": t.cost_per_1k_tokens for t in snap.targets}
        routes = self.query_one("#routes-table", DataTable)
        routes.clear()
        total = sum(r.requests for r in snap.routes) or 1
        for r in snap.routes:
            escalated = ", ".join(f"{k} {v}" for k, v in sorted(r.escalations.items()))
            cost = r.cold_tokens / 1000 * prices.get(r.route, 0.0)
            routes.add_row(
                r.route,
                f"{r.requests} ({r.requests / total:.0%})",
                f"{r.errors / r.requests:.1%}" if r.requests else "-",
                _s(r.latency_p95),
                "-" if r.route == "hot" else f"{cost:.4g}",
                escalated or "-",
            )

    def _show_safety(self, snap: Snapshot) -> None:
        """The active release's signed policy, and what it did in the window. Telemetry
        keeps counts only: what a detector matched is never stored, so never shown."""
        lines = ["[b]Safety policy[/b] " + ("of " + snap.active if snap.active else "")]
        policy = snap.safety
        if policy is None or (policy.input is None and policy.output is None):
            lines.append("the active release has none: requests and answers pass unchecked")
        for side in (policy.input, policy.output) if policy else ():
            if side is not None:
                acts = ", ".join(f"{d} {side.action_for(d)}" for d in side.detectors.enabled)
                lines.append(f"{side.direction}: {acts}")
        guard = snap.guard
        if guard is not None:
            lines.append(
                f"last 5 min: {guard.requests} requests, {guard.refused} refused, "
                f"{guard.stopped} answers stopped"
            )
        self.query_one("#safety-status", Static).update("\n".join(lines))
        table = self.query_one("#guard-table", DataTable)
        table.clear()
        for (direction, detector, action), n in (guard.findings if guard else {}).items():
            table.add_row(direction, detector, action, str(n))
        self.query_one("#retrieval-status", Static).update(_retrieval_lines(snap.retrieval))

    # -- navigation and actions --------------------------------------------------------

    def action_show(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_activate(self) -> None:
        table = self.query_one("#releases-table", DataTable)
        if self.snapshot is None or not self.snapshot.releases:
            self.notify("no release to activate", severity="warning")
            return
        self.action_show("releases")
        ref = self.snapshot.releases[table.cursor_row].ref
        if self.snapshot.frozen:  # the store would refuse: say why instead of asking
            self.notify(
                f"releases are frozen ({self.snapshot.frozen_reason}): nothing activates "
                "until unfrozen (u); rollback still works",
                severity="warning",
            )
            return
        change = f"The active release changes from {self.snapshot.active or '-'} to {ref}."
        self._confirm(
            "Activate release", change, True, lambda why: self._actions.activate(ref, why)
        )

    def _running_rollout(self) -> dict | None:
        rollout = self.snapshot.rollout if self.snapshot else None
        return rollout if rollout and rollout["state"] == "running" else None

    def action_promote(self) -> None:
        rollout = self._running_rollout()
        if rollout is None:
            self.notify("no rollout is running", severity="warning")
            return
        change = (
            f"{rollout['candidate']} becomes the active release now; {self.snapshot.active} "
            "stays as the previous good release."
        )
        self._confirm(
            "Promote rollout", change, False, lambda why: self._actions.promote_rollout(why)
        )

    def action_rollback(self) -> None:
        rollout = self._running_rollout()
        if rollout is not None:  # during a rollout, r aborts it
            self.action_show("rollout")
            change = (
                f"The {rollout['mode']} of {rollout['candidate']} stops: it gets no more "
                f"traffic and is unloaded; {self.snapshot.active} keeps serving."
            )
            self._confirm(
                "Abort rollout", change, True, lambda why: self._actions.abort_rollout(why)
            )
            return
        previous = (
            next((r.ref for r in self.snapshot.releases if r.state == "previous-good"), None)
            if self.snapshot
            else None
        )
        if previous is None:  # the store would refuse: say so instead of offering Confirm
            self.notify("there is no previous good release to roll back to", severity="warning")
            return
        change = f"The active release changes from {self.snapshot.active} back to {previous}."
        self._confirm("Roll back", change, False, lambda why: self._actions.rollback(why))

    def action_freeze(self) -> None:
        self._confirm(
            "Freeze releases",
            "Nothing will activate until unfrozen; rollback still works.",
            True,
            lambda why: self._actions.freeze(why),
        )

    def action_unfreeze(self) -> None:
        self._confirm(
            "Unfreeze releases",
            "Activations will be allowed again.",
            False,
            lambda why: self._actions.unfreeze(why),
        )

    def action_fallback(self) -> None:
        routing = self.snapshot.routing if self.snapshot else None
        if routing is None:
            return
        self.action_show("routing")
        if routing.fallback:
            change = "Requests are routed by the release's policy again."
        elif not self.snapshot.targets:
            self.notify(
                "no cold-path target is registered (appliance route add)", severity="warning"
            )
            return
        else:
            change = f"Every request goes to the cold path ({self.snapshot.targets[0].name} first)."
        on = not routing.fallback
        self._confirm(
            "Fallback " + ("on" if on else "off"),
            change,
            on,
            lambda why: self._actions.fallback(on, why),
        )

    def action_incident(self) -> None:
        routing = self.snapshot.routing if self.snapshot else None
        if routing is None:
            return
        if routing.incident:
            change = "Releases are unfrozen and the fallback turned off."
            self._confirm(
                "End incident", change, False, lambda why: self._actions.end_incident(why)
            )
            return
        change = (
            "Releases freeze (rollback still works: r), and every request goes to the "
            "fallback when a cold-path target is registered."
        )
        self._confirm("Start incident", change, True, lambda why: self._actions.start_incident(why))

    def _confirm(
        self, title: str, change: str, reason_required: bool, act: Callable[[str], str]
    ) -> None:
        if self._actions is None:
            self.notify("this console is read-only", severity="warning")
            return

        def done(reason: str | None) -> None:
            if reason is not None:
                self._run_action(act, reason)

        self.push_screen(ConfirmAction(title, change, reason_required), done)

    @work(thread=True, group="actions")
    def _run_action(self, act: Callable[[str], str], reason: str) -> None:
        try:
            message = act(reason)
        except ApplianceError as exc:
            self.call_from_thread(self.notify, exc.message, title="refused", severity="error")
            return
        self.call_from_thread(self.notify, message, title="done")
        self.call_from_thread(self.refresh_data)


def _noise(look: dict) -> str:
    """A shadow's divergence from stable, against stable's own (its noise floor)."""
    if look.get("noise_floor") is None or look.get("divergence") is None:
        return ""
    return f"\nnoise floor {look['noise_floor']:.2f}, shadow diverges by {look['divergence']:+.2f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def _retrieval_lines(stats: RetrievalStats | None) -> str:
    """Retrieval on its own: a fault in what it finds shows here, not in the answers."""
    if stats is None or not stats.searches:
        return "\n[b]Retrieval[/b]\nno request retrieved in the last 5 min"
    p50, p95 = (
        "-" if s is None else f"{s * 1000:.1f} ms" for s in (stats.latency_p50, stats.latency_p95)
    )
    top = ", ".join(f"{passage} {n}" for passage, n in stats.top_passages) or "-"
    return (
        f"\n[b]Retrieval[/b]\nlast 5 min: {stats.searches} searches, {stats.empty} found "
        f"nothing, p50 {p50}, p95 {p95}\nmost retrieved: {top}"
    )


def _ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"
