"""Peak-call capacity, end to end: how many calls/s one box carries, and what managers then see.

Measured from outside, on this machine, with everything on it: simulated Asterisk hosts (their
own process, a client too cheap to be the bottleneck: its CPU and its lag are reported) ->
``vochi-call-service`` processes -> ``retailcrm-service`` instances on one PostgreSQL -> the
RetailCRM sandbox with its rate limits on and one account per enterprise (40 by default). Calls
are the fixture calls (``tests/fixtures/asterisk-calls.jsonl``: ring-group escalation, missed,
outgoing, internal, unknown number, CRM-originated leg, recovered hangup), paced dial -> bridge
after 1 s -> hangup after 1.5 s, arriving as a Poisson process.

What is measured:

- at RetailCRM (the sandbox stamps arrivals): popup latency, host webhook sent ->
  ``telephony/call/event`` received; history latency, hangup sent -> the call in
  ``telephony/calls/upload``; RetailCRM requests per call; rate-limited (503) answers;
- at the hosts: webhook acknowledgement latency; loss = calls whose hangup the call service
  acknowledged but whose history never reached RetailCRM (judged at the end of the run; a
  history still pending in the outbox then is counted as late, ``late_at_end``, not lost);
- PostgreSQL statements per event (counted by each process; ``_peak_calls.instrument``) and
  transactions per event (``pg_stat_database``); CPU and peak RSS of every process.

The knee: the offered load steps up until popup p99 passes 1 s, loss appears (history missing
once the step has drained), or acknowledgement p99 passes 50 ms; the last good step is the knee.
Scenarios at a fixed load (``--load``, 100 calls/s): steady (on its own); then, back to back
under one continuous load, PostgreSQL restarted (only when it is the benchmark's own embedded
server), one service instance killed with SIGKILL (restarted by the benchmark after 1 s, as a
supervisor would), the sandbox down (30 s; 12 s with ``--quick``), a 10x burst for 5 s. Each
reports loss, recovery time (back within the knee's limits, and its backlog delivered) and the
popups never shown, by reason.

Baseline, measured in the same run on the same stand-in and database: the previous system's
path (``_peak_calls.naive``: one POST per event from the call service in a fire-and-forget task,
the config read from PostgreSQL per event, one RetailCRM request per entity, no pacing, no
retry), with as many processes of each kind. ``ratio`` = our knee / the naive knee.

    python benchmarks/peak_calls.py [--quick] [--load 100] [--services 1] [--call-services 1]

One process of each by default: on this 2-core box two service instances and two call services
carry less than one of each (the processes compete for the same cores, and each instance's
batches and group commits are half as full): at 300 calls/s, popup p99 0.5-1.7 s with one of
each against 2.7-5.0 s with two (--probe, paired runs). ``--services 2 --call-services 2``
measures the scale-out path; more boxes, not more processes on one, is how it scales.

Prints a table and writes a PNG (popup latency over time with the fault windows shaded; knee
curves, ours beside naive) under ``benchmarks/results/``; the last line is one JSON object.
PostgreSQL: ``DATABASE_URL`` (a superuser DSN; a scratch database is created and dropped) or a
temporary embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

POPUP_LIMIT_S = 1.0
# Between two fault scenarios: longer than a call (hangup 2.5 s after the dial) and its history.
GUARD_S = 4.0
ACK_LIMIT_MS = 50.0
CONTENDED_PCT = 50.0  # other processes' CPU, % of one core


@dataclass(frozen=True)
class Plan:
    """Durations and loads of one run."""

    quick: bool
    steps: tuple[float, ...]
    step_s: float
    step_drain_s: float
    load: float
    steady_s: float
    burst_s: float
    burst_factor: float
    outage_s: float
    observe_s: float
    final_drain_s: float
    warmup_s: float = 3.0

    @classmethod
    def make(cls, quick: bool, load: float) -> Plan:
        if quick:
            return cls(
                quick=True,
                steps=(10, 20, 30, 50, 75, 100, 200, 300, 400, 500),
                step_s=5.0,
                step_drain_s=20.0,
                load=load,
                steady_s=10.0,
                burst_s=5.0,
                burst_factor=10.0,
                outage_s=12.0,
                observe_s=10.0,
                final_drain_s=75.0,
            )
        return cls(
            quick=False,
            steps=(10, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300, 350, 400, 450, 500),
            step_s=30.0,
            step_drain_s=60.0,
            load=load,
            steady_s=60.0,
            burst_s=5.0,
            burst_factor=10.0,
            outage_s=30.0,
            observe_s=30.0,
            final_drain_s=120.0,
        )

    def scenario_s(self) -> float:
        return (
            self.steady_s
            + (self.burst_s + self.observe_s)
            + (self.outage_s + self.observe_s)
            + 2 * (self.observe_s + 2)
            + 3 * GUARD_S
        )

    def estimate(self) -> tuple[float, float]:
        """(typical, worst) seconds: the knee searches stop at the first failing step."""
        per_step = self.step_s + 5
        startup = 40.0
        # Typical: as measured on the 2-core development machine, ours fails at 350 calls/s
        # and naive at 100 (a full run took 15 min).
        searched = sum(1 for s in self.steps if s <= 350) + sum(1 for s in self.steps if s <= 100)
        typical = startup + searched * per_step + self.scenario_s() + self.final_drain_s / 2
        worst = (
            startup
            + 2 * len(self.steps) * (self.step_s + self.step_drain_s)
            + self.scenario_s()
            + self.final_drain_s
        )
        return typical, worst


# -- roles: the processes of the run ---------------------------------------------------------


def run_role(args: argparse.Namespace) -> int:

    from _peak_calls import instrument

    if args.role == "hosts":
        from _peak_calls import hosts

        with contextlib.suppress(OSError):  # not permitted: it runs at the normal priority
            os.nice(hosts.NICE)
        return hosts.main(args.plan)
    if args.role == "sandbox":
        from _peak_calls import crm

        crm.serve(args.port, args.accounts)
        return 0
    instrument.install()
    instrument.report_to(args.counts, args.role)
    dsn = os.environ["DATABASE_URL"]
    if args.role == "service":
        from retailcrm_service.cli import main as service_main

        return service_main(
            ["--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port", str(args.port)]
        )
    if args.role == "call-service":
        from adapters.call_service import main as call_service

        argv = ["--port", str(args.port), "--target", args.target, "--log-level", "warning"]
        return call_service(argv)
    from _peak_calls import naive

    if args.role == "naive-service":
        naive.serve(naive.service_app(dsn), args.port)
    else:
        naive.serve(naive.call_service_app(dsn, args.target.partition("=")[2]), args.port)
    return 0


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    stack: Any
    progress: Any
    templates: list[Any]
    receipts: Any
    phase_no: int = 0
    records: Any = None  # the fault timeline's calls
    timeline_t0: float = 0.0
    warned_priority: bool = False

    def new_phase(self) -> str:
        """A new UniqueId prefix: every record downstream tells its step or segment by it."""
        self.phase_no += 1
        return str(1765000000 + self.phase_no)

    async def pull(self) -> int:
        return int(self.receipts.add(await self.stack.receipts()))

    async def snapshot(self) -> dict[str, Any]:
        await self.pull()
        t, cpu, rss = self.stack.monitor.mark()
        return {
            "t": t,
            "cpu": cpu,
            "rss": rss,
            "queries": self.stack.queries(),
            "xacts": await self.stack.transactions(),
            "requests": dict(self.receipts.requests),
            "rate_limited": self.receipts.rate_limited,
        }

    async def drain(self, expected: list[str], wait_s: float) -> float:
        """Wait until every expected history arrived (none expected: until the design is idle),
        or the design is idle (what is missing then is lost), or ``wait_s`` passed."""
        started = time.monotonic()
        idle = 0
        for _ in range(int(wait_s) + 1):  # one pull a second, bounded
            await self.pull()
            if expected and all(uid in self.receipts.calls for uid in expected):
                await asyncio.sleep(1.0)  # popups still on their way (the naive path)
                await self.pull()
                break
            idle = idle + 1 if await self.stack.idle() else 0
            if idle >= 2 or time.monotonic() - started > wait_s:
                break
            await asyncio.sleep(1.0)
        return time.monotonic() - started

    async def play(
        self, label: str, segments: list[dict[str, Any]], t0: float | None = None
    ) -> Any:
        from _peak_calls.analysis import Calls

        self.progress.phase(label)
        result = await self.stack.play(
            segments, t0=t0 or time.time() + 0.5, on_progress=self.progress.update
        )
        if result["niceness"] >= 0 and not self.warned_priority:
            self.warned_priority = True
            self.progress.note("the host simulator could not raise its priority (not root?)")
        return Calls(
            result["calls"],
            result["hooks"],
            self.templates,
            host_cpu_pct=round(result["cpu_s"] / max(result["wall_s"], 1e-9) * 100, 1),
            host_lag_p99_ms=result["lag_p99_ms"],
        )


def usage(before: dict[str, Any], loaded: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """CPU (% of one core, while loaded) and peak RSS (MiB) per process kind; counters per call."""
    wall = max(loaded["t"] - before["t"], 1e-9)
    cpu: Counter[str] = Counter()
    rss: Counter[str] = Counter()
    processes: dict[str, dict[str, float]] = {}
    for name, seconds in loaded["cpu"].items():
        pct = (seconds - before["cpu"].get(name, 0.0)) / wall * 100
        cpu[_kind(name)] += pct
        if name != "machine":
            processes[name] = {"cpu_pct": round(pct, 1)}
    for name, peak in loaded["rss"].items():
        rss[_kind(name)] += peak / 2**20
        processes.setdefault(name, {})["rss_mib"] = round(peak / 2**20, 1)
    requests = Counter(after["requests"])
    requests.subtract(before["requests"])
    queries = Counter(after["queries"])
    queries.subtract(before["queries"])
    return {
        "cpu_pct": {k: round(v, 1) for k, v in sorted(cpu.items())},
        "rss_mib": {k: round(v, 1) for k, v in sorted(rss.items())},
        "processes": dict(sorted(processes.items())),
        "requests": {k: v for k, v in requests.items() if v},
        "queries": dict(queries),
        "xacts": after["xacts"] - before["xacts"],
        "rate_limited": after["rate_limited"] - before["rate_limited"],
    }


def cpu_ms_per_call(step: dict[str, Any], load: float) -> dict[str, float]:
    """CPU milliseconds per call of each process kind at ``load`` calls/s, the simulated hosts,
    and ``ours_and_postgres``: the figure to size a box by (the sandbox and the hosts stand in
    for RetailCRM and Asterisk, which run elsewhere). PostgreSQL counts only when it is measured
    (not with a ``DATABASE_URL`` on another machine)."""
    per_call = {k: v * 10 / load for k, v in step["cpu_pct"].items()}
    out = {k: round(v, 2) for k, v in sorted(per_call.items())}
    out["hosts"] = round(step["host_cpu_pct"] * 10 / load, 2)
    out["ours_and_postgres"] = round(sum(v for k, v in per_call.items() if k != "sandbox"), 2)
    return out


def _kind(name: str) -> str:
    for kind in ("call-service", "service"):
        if f"-{kind}-" in f"{name}-":
            return kind
    return name


def step_figures(records: Any, bench: Bench, use: dict[str, Any]) -> dict[str, Any]:
    from _peak_calls.analysis import measure

    cpu = dict(use["cpu_pct"])
    machine = cpu.pop("machine", 0.0)
    # Not ours, not the simulator's: other work on the same cores while the step ran.
    other = max(0.0, machine - sum(cpu.values()) - records.host_cpu_pct)
    figures = measure(records, bench.receipts)
    out = figures.summary()
    telephony = sum(v for k, v in use["requests"].items() if k.startswith("telephony/"))
    events = sum(1 for h in records.hooks if h[4] == 200 and h[5])
    out.update(
        crm_requests=telephony,
        crm_requests_per_call=telephony / max(1, out["calls"]),
        crm_rate_limited=use["rate_limited"],
        pg_queries_per_event=sum(use["queries"].values()) / max(1, events),
        pg_xacts_per_event=use["xacts"] / max(1, events),
        events=events,
        cpu_pct=cpu,
        other_cpu_pct=round(other, 1),
        rss_mib=use["rss_mib"],
        processes=use["processes"],
        host_cpu_pct=records.host_cpu_pct,
        host_lag_p99_ms=records.host_lag_p99_ms,
    )
    out["_figures"] = figures
    return out


def verdict(step: dict[str, Any]) -> str:
    reasons = []
    if not step["popup_p99_ms"] <= POPUP_LIMIT_S * 1000:
        reasons.append("popup p99 > 1 s")
    if step["lost"]:
        reasons.append("loss")
    if not step["ack_p99_ms"] <= ACK_LIMIT_MS:
        reasons.append("ack p99 > 50 ms")
    return ", ".join(reasons) or "good"


async def run_step(bench: Bench, design: str, rate: float, seconds: float) -> dict[str, Any]:
    phase = bench.new_phase()
    before = await bench.snapshot()
    segment = {"phase": phase, "start": 0.0, "duration": seconds, "rate": rate}
    records = await bench.play(f"{design}: {rate:g} calls/s", [segment])
    loaded = await bench.snapshot()
    drained = await bench.drain(records.expected_history(), bench.plan.step_drain_s)
    after = await bench.snapshot()
    step = step_figures(records, bench, usage(before, loaded, after))
    step.update(design=design, rate=rate, phase=phase, drain_s=round(drained, 1))
    step["_records"] = records
    step["verdict"] = verdict(step)
    bench.progress.note(
        f"{design:<5} {rate:>5g} calls/s: popup p99 {_ms(step['popup_p99_ms'])}, ack p99 "
        f"{_ms(step['ack_p99_ms'])}, lost {step['lost']}, host errors {step['host_errors']}"
        f" -> {step['verdict']}"
    )
    return step


def _ms(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "never"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


async def knee(bench: Bench, design: str) -> tuple[float, list[dict[str, Any]]]:
    """Step the load up until a step fails; the knee is the last good step (0 if none)."""
    steps = []
    for rate in bench.plan.steps:
        step = await run_step(bench, design, rate, bench.plan.step_s)
        steps.append(step)
        if step["verdict"] != "good":
            break
    good = [s["rate"] for s in steps if s["verdict"] == "good"]
    return (max(good) if good and steps[0]["verdict"] == "good" else 0.0), steps


async def warm_up(bench: Bench, design: str) -> None:
    phase = bench.new_phase()
    segment = {"phase": phase, "start": 0.0, "duration": bench.plan.warmup_s, "rate": 10.0}
    records = await bench.play(f"{design}: warm-up", [segment])
    await bench.drain(records.expected_history(), 15.0)


# -- scenarios --------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    phases: list[str]
    start: float  # offset from t0
    end: float
    fault: tuple[float, float] | None = None  # wall-clock window, filled in while running
    fault_label: str = ""
    skipped: str = ""
    figures: Any = None


async def scenarios(bench: Bench) -> list[Scenario]:
    """The fault timeline at the fixed load, one continuous run of the hosts."""
    plan, stack, load = bench.plan, bench.stack, bench.plan.load
    segments: list[dict[str, Any]] = []
    offset = 0.0

    def segment(rate: float, seconds: float) -> str:
        nonlocal offset
        phase = bench.new_phase()
        segments.append({"phase": phase, "start": offset, "duration": seconds, "rate": rate})
        offset += seconds
        return phase

    # Back to back under one continuous load, the mildest first: a scenario whose backlog
    # outlasts its observation spills into the next one (each is judged by its own calls).
    # Between two scenarios a guard segment belongs to neither: its calls still count for loss
    # (judged over the whole timeline), but a scenario's last calls, still being delivered,
    # are not its figures when the next fault begins (the sandbox going down used to put its
    # 30 s into the previous scenario's history p99).
    timeline: list[Scenario] = []
    start = offset
    phases = [segment(load, plan.observe_s + 2)]
    timeline.append(
        Scenario("postgres_restart", phases, start, offset, fault_label="PostgreSQL restart")
    )
    if not stack.postgres_owned:
        timeline[-1].skipped = "PostgreSQL is not the benchmark's own (DATABASE_URL is set)"
    segment(load, GUARD_S)
    start = offset
    phases = [segment(load, plan.observe_s + 2)]
    timeline.append(Scenario("service_sigkill", phases, start, offset, fault_label="SIGKILL"))
    segment(load, GUARD_S)
    start = offset
    phases = [segment(load, plan.outage_s), segment(load, plan.observe_s)]
    timeline.append(Scenario("sandbox_down", phases, start, offset, fault_label="sandbox down"))
    segment(load, GUARD_S)
    start = offset
    phases = [segment(load * plan.burst_factor, plan.burst_s), segment(load, plan.observe_s)]
    timeline.append(Scenario("burst_10x", phases, start, offset, fault_label="10x burst"))

    t0 = time.time() + 1.0
    driver = asyncio.create_task(_inject(bench, timeline, t0))
    try:
        bench.records = await bench.play(f"ours: faults at {load:g} calls/s", segments, t0=t0)
    finally:
        await driver
    bench.timeline_t0 = t0
    return timeline


async def _at(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _inject(bench: Bench, timeline: list[Scenario], t0: float) -> None:
    stack, plan = bench.stack, bench.plan
    named = {s.name: s for s in timeline}
    burst, down, kill, pg = (
        named[n] for n in ("burst_10x", "sandbox_down", "service_sigkill", "postgres_restart")
    )
    for scenario in timeline:
        await _at(t0 + scenario.start)
        if scenario is burst:
            burst.fault = (t0 + burst.start, t0 + burst.start + plan.burst_s)
        elif scenario is down:
            began = time.time()
            await stack.sandbox_down(True)
            await _at(began + plan.outage_s)
            await stack.sandbox_down(False)
            down.fault = (began, time.time())
        elif scenario is kill:
            await _at(t0 + kill.start + 1.0)
            began = time.time()
            proc = await stack.kill_service(len(stack.services_procs) - 1)
            bench.progress.note(f"SIGKILL {proc.name}; restarting it")
            await asyncio.sleep(1.0)  # a supervisor's restart delay
            await stack.restart(proc)
            kill.fault = (began, time.time())
        elif scenario is pg and not pg.skipped:
            await _at(t0 + pg.start + 1.0)
            began = time.time()
            await stack.restart_postgres()
            pg.fault = (began, time.time())
            bench.progress.note(f"PostgreSQL restarted in {pg.fault[1] - pg.fault[0]:.1f} s")
    await _at(t0 + timeline[-1].end)


async def finish_scenarios(bench: Bench, timeline: list[Scenario]) -> dict[str, Any]:
    from _peak_calls.analysis import finite, measure, recovery

    outcomes = await bench.stack.outbox_outcomes()
    out: dict[str, Any] = {}
    for scenario in timeline:
        records = bench.records.of(scenario.phases)
        figures = measure(records, bench.receipts)
        summary = figures.summary()
        # Popup rows the service did not deliver, by outcome (exact, by the calls' UniqueIds);
        # the rest of the missing popups never got past the call service (its client's drops
        # are counted by reason for the whole timeline, not per scenario).
        expired: Counter[str] = Counter()
        for phase in scenario.phases:
            expired.update(outcomes.get(phase, Counter()))
        rest = summary["popups_missing"] - sum(expired.values())
        if rest > 0:
            expired["dropped_before_service"] = rest
        late = await bench.stack.pending_history(figures.lost)
        entry: dict[str, Any] = {
            "calls": summary["calls"],
            "host_errors": summary["host_errors"],
            "lost": summary["lost"] - len(late),
            "late_at_end": len(late),
            "popup_p50_ms": finite(summary["popup_p50_ms"]),
            "popup_p99_ms": finite(summary["popup_p99_ms"]),
            "history_p99_ms": finite(summary["history_p99_ms"]),
            "ack_p99_ms": finite(summary["ack_p99_ms"]),
            "popups_missing": summary["popups_missing"],
            "popups_expired": dict(sorted(expired.items())),
        }
        if scenario.skipped:
            entry["skipped"] = scenario.skipped
        if scenario.fault is not None:
            t0 = bench.timeline_t0
            entry["fault_s"] = [round(scenario.fault[0] - t0, 1), round(scenario.fault[1] - t0, 1)]
            entry.update(
                recovery(
                    figures,
                    scenario.fault[1],
                    popup_limit=POPUP_LIMIT_S,
                    ack_limit=ACK_LIMIT_MS / 1000,
                    until=t0 + scenario.end,
                )
            )
        out[scenario.name] = entry
        scenario.figures = figures
    return out


async def at_load(bench: Bench, plan: Plan, label: str) -> tuple[Any, str, dict[str, Any]]:
    """``plan.load`` calls/s for ``plan.steady_s``, drained: (records, phase, figures)."""
    before = await bench.snapshot()
    phase = bench.new_phase()
    segment = {"phase": phase, "start": 0.0, "duration": plan.steady_s, "rate": plan.load}
    records = await bench.play(label, [segment])
    loaded = await bench.snapshot()
    await bench.drain(records.expected_history(), plan.step_drain_s)
    figures = step_figures(records, bench, usage(before, loaded, await bench.snapshot()))
    return records, phase, figures


async def probe(bench: Bench, plan: Plan) -> dict[str, Any]:
    """``--probe``: ours alone at ``--load`` for ``--probe`` seconds (to profile, or to try a
    change quickly); no knee search, no faults, no baseline."""
    _, _, figures = await at_load(bench, plan, f"ours: probe {plan.load:g} calls/s")
    bench.progress.close()
    out = {"bench": "peak_calls", "probe": True, "load_calls_per_s": plan.load}
    out.update({k: v for k, v in figures.items() if not k.startswith("_")})
    out["cpu_ms_per_call"] = cpu_ms_per_call(figures, plan.load)
    return out


# -- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from _peak_calls import report
    from _peak_calls.analysis import Receipts, finite, measure
    from _peak_calls.calls import templates
    from _peak_calls.progress import Progress
    from _peak_calls.stack import Stack, database

    progress = Progress(plan.steady_s + 30 if args.probe else plan.estimate()[0])
    owned = not os.environ.get("DATABASE_URL", "").strip()
    async with (
        database() as dsn,
        Stack(
            dsn=dsn,
            script=str(SCRIPT),
            enterprises=args.enterprises,
            services=args.services,
            call_services=args.call_services,
            postgres_owned=owned,
        ) as stack,
    ):
        bench = Bench(plan, stack, progress, templates(), Receipts())
        progress.phase("starting ours")
        await stack.start("ours")
        await warm_up(bench, "ours")
        if args.probe:
            return await probe(bench, plan)
        ours_knee, ours_steps = await knee(bench, "ours")
        await bench.drain([], plan.step_drain_s)  # what the failing step left behind

        records, phase, steady = await at_load(bench, plan, f"ours: steady {plan.load:g} calls/s")
        steady.update(design="ours", rate=plan.load, phase=phase)

        drops_start = await stack.client_drops()
        timeline = await scenarios(bench)
        progress.phase("ours: final drain")
        scenario_records = bench.records
        await bench.drain(scenario_records.expected_history(), plan.final_drain_s)
        # The steady figures again, now that late arrivals are in: late is not lost.
        final = measure(records, bench.receipts)
        steady.update(final.summary())
        steady["late_at_end"] = len(await stack.pending_history(final.lost))
        steady["lost"] -= steady["late_at_end"]
        client_drops = await stack.client_drops()
        client_drops.subtract(drops_start)
        fault_results = await finish_scenarios(bench, timeline)
        rate_limited = bench.receipts.rate_limited
        # Loss is judged at the very end, over every call ours was given: late is not lost.
        # A history still pending in the outbox when the run stops waiting is late, not lost.
        missing = [
            uid
            for r in [*(s["_records"] for s in ours_steps), records, scenario_records]
            for uid in measure(r, bench.receipts).lost
        ]
        pending = await stack.pending_history(missing)
        lost = [uid for uid in missing if uid not in pending]
        await stack.stop_design()

        progress.phase("starting naive")
        await stack.start("naive")
        await warm_up(bench, "naive")
        naive_mark = bench.receipts.rate_limited
        naive_knee, naive_steps = await knee(bench, "naive")
        naive_rate_limited = bench.receipts.rate_limited - naive_mark
        await stack.stop_design()
        progress.close()

    ratio = ours_knee / naive_knee if naive_knee else None
    others = [s["other_cpu_pct"] for s in [*ours_steps, *naive_steps, steady]]
    scenarios_out = {
        "steady": {
            "calls": steady["calls"],
            "host_errors": steady["host_errors"],
            "lost": steady["lost"],
            "late_at_end": steady["late_at_end"],
            "popup_p50_ms": finite(steady["popup_p50_ms"]),
            "popup_p99_ms": finite(steady["popup_p99_ms"]),
            "history_p99_ms": finite(steady["history_p99_ms"]),
            "ack_p99_ms": finite(steady["ack_p99_ms"]),
            "popups_missing": steady["popups_missing"],
        },
        **fault_results,
    }
    chart = report.charts(
        Path(args.results_dir),
        timeline=timeline,
        t0=bench.timeline_t0,
        records=bench.records,
        ours=ours_steps,
        naive=naive_steps,
        ours_knee=ours_knee,
        naive_knee=naive_knee,
        load=plan.load,
    )
    figures = {
        "bench": "peak_calls",
        "quick": plan.quick,
        "load_calls_per_s": plan.load,
        "popup_p50_ms": finite(steady["popup_p50_ms"]),
        "popup_p99_ms": finite(steady["popup_p99_ms"]),
        "history_p99_ms": finite(steady["history_p99_ms"]),
        "ack_p99_ms": finite(steady["ack_p99_ms"]),
        "lost": len(lost),
        "late_at_end": len(pending),
        "crm_rate_limited": rate_limited,
        "crm_requests_per_call": round(steady["crm_requests_per_call"], 3),
        "pg_queries_per_event": round(steady["pg_queries_per_event"], 2),
        "pg_xacts_per_event": round(steady["pg_xacts_per_event"], 2),
        "knee_calls_per_s": ours_knee,
        "naive_knee_calls_per_s": naive_knee,
        "ratio": None if ratio is None else round(ratio, 2),
        "naive_crm_rate_limited": naive_rate_limited,
        "host_cpu_pct": steady["host_cpu_pct"],
        "host_lag_p99_ms": steady["host_lag_p99_ms"],
        "cpu_pct": steady["cpu_pct"],
        "cpu_ms_per_call": cpu_ms_per_call(steady, plan.load),
        "rss_mib": steady["rss_mib"],
        "other_cpu_pct": steady["other_cpu_pct"],
        # Other work on the cores during the knee searches and the steady run, at its worst:
        # past CONTENDED_PCT the figures say more about the machine than about the system.
        "other_cpu_pct_max": max(others),
        "contended": max(others) > CONTENDED_PCT,
        "processes": steady["processes"],
        "enterprises": args.enterprises,
        "services": args.services,
        "call_services": args.call_services,
        "chart": str(chart),
        "scenarios": scenarios_out,
        "scenario_client_drops": {k: v for k, v in sorted(client_drops.items()) if v > 0},
        "knee_steps": {
            "ours": [report.step_json(s) for s in ours_steps],
            "naive": [report.step_json(s) for s in naive_steps],
        },
    }
    report.table(figures, ours_steps, naive_steps, steady)
    report.save(Path(args.results_dir), figures)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (under 5 minutes)")
    parser.add_argument("--load", type=float, default=100.0, help="scenario load, calls/s")
    parser.add_argument("--enterprises", type=int, default=40)
    parser.add_argument(
        "--services", type=int, default=1, help="retailcrm-service instances (default: 1)"
    )
    parser.add_argument(
        "--call-services", type=int, default=1, help="call service processes (default: 1)"
    )
    parser.add_argument(
        "--probe",
        type=float,
        metavar="SECONDS",
        help="only ours at --load for SECONDS, then its figures (profiling; no knee, no faults)",
    )
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--role", help=argparse.SUPPRESS)
    for hidden in ("--plan", "--accounts", "--counts", "--target"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return run_role(args)

    plan = Plan.make(args.quick, args.load)
    if args.probe:
        plan = dataclasses.replace(plan, steady_s=args.probe)
        figures = asyncio.run(run(args, plan))
        print(json.dumps(figures))
        return 0
    typical, worst = plan.estimate()
    print(
        f"peak_calls{' --quick' if plan.quick else ''}: about {typical / 60:.0f} min "
        f"(at most {worst / 60:.0f} min: the knee searches stop at the first failing step); "
        f"{args.enterprises} enterprises, {args.call_services} call services, "
        f"{args.services} service instances, {os.cpu_count()} cores",
        flush=True,
    )
    figures = asyncio.run(run(args, plan))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
