"""``neuron-serve bench``: a load generator and report for any OpenAI-compatible streaming endpoint.

Roles, one file each: ``workload`` (presets, prompts of exact token length, JSONL), ``tokenizer`` (local
or the server's), ``client`` (one streamed request, timed), ``runner`` (closed- and open-loop load),
``metrics`` (vLLM's definitions and key names), ``cost`` (USD per token on Inf2/Trn1), ``report``,
``plots`` and ``compare`` (the results directory), ``cli`` (the command line).
"""

from neuron_serve.bench.cli import add_bench_parser, run_bench, run_compare

__all__ = ["add_bench_parser", "run_bench", "run_compare"]
