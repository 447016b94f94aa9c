"""``neuron-serve usage USAGE_LOG --instance TYPE``: what each tenant used and what it cost.

Reads the usage log a server appends (``serve --usage-log``: one JSON line per request, no text). The
instance's cost over the span the log covers (its first to its last record) is shared between the
tenants in proportion to their tokens, prompt and completion, as an instance's time goes to the
tokens it computes. The price comes from the same catalog as ``bench``'s (``bench/cost.py``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from neuron_serve.bench.cost import SECONDS_PER_HOUR, resolve_cost_model


@dataclass
class TenantUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def read_usage(path: Path) -> tuple[dict[str, TenantUsage], float, int]:
    """(usage by tenant, seconds the log spans, lines that were not usage records)."""
    by_tenant: dict[str, TenantUsage] = defaultdict(TenantUsage)
    times, skipped = [], 0
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            tenant, when = record.get("tenant") or "(no tenant)", float(record["time"])
            usage = by_tenant[tenant]
            usage.prompt_tokens += int(record["prompt_tokens"])
            usage.completion_tokens += int(record["completion_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
            continue
        usage.requests += 1
        times.append(when)
    if not times:
        raise ValueError(f"{path}: no usage records (JSON lines with time, tenant and token counts)")
    return dict(by_tenant), max(times) - min(times), skipped


def report(by_tenant: dict[str, TenantUsage], span_s: float, usd_per_hour: float) -> list[str]:
    total_tokens = sum(u.tokens for u in by_tenant.values()) or 1
    cost = usd_per_hour * span_s / SECONDS_PER_HOUR
    lines = [
        f"{span_s / 3600:.2f} h at ${usd_per_hour:.2f}/h = ${cost:.2f}, shared by tokens",
        "| tenant | requests | prompt tokens | completion tokens | share | USD | USD per 1M tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, usage in sorted(by_tenant.items(), key=lambda item: -item[1].tokens):
        share = usage.tokens / total_tokens
        per_million = cost * share / usage.tokens * 1e6 if usage.tokens else 0.0
        lines.append(
            f"| {name} | {usage.requests} | {usage.prompt_tokens} | {usage.completion_tokens} | {share:.1%} "
            f"| {cost * share:.4f} | {per_million:.4f} |"
        )
    return lines


def add_usage_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("usage", help="each tenant's requests, tokens and cost, from a server's usage log")
    p.add_argument("usage_log", type=Path, help="the file `serve --usage-log` appends to")
    p.add_argument("--instance", required=True, help="the instance type the server ran on, e.g. inf2.xlarge")
    p.add_argument("--price-file", type=Path, help='JSON {"inf2.xlarge": 0.99}: $/hour overrides, as in bench')
    p.add_argument("--usd-per-hour", type=float, help="the instance's price, overriding the catalog")
    p.set_defaults(func=run_usage)


def run_usage(args: argparse.Namespace) -> int:
    price = resolve_cost_model(args.instance, args.price_file, args.usd_per_hour).usd_per_hour
    by_tenant, span_s, skipped = read_usage(args.usage_log)
    print("\n".join(report(by_tenant, span_s, price)))
    if skipped:
        print(f"skipped {skipped} line(s) that were not usage records")
    return 0
