"""`Linear`: nn.Linear computed as weight @ x^T.

Same parameters, same result, another operand order for the BLAS call: the weight is the left
matrix, so its many output rows are the GEMM's long dimension and the step's few tokens its short
one. Measured on the development machine (AVX2 AMD EPYC, MKL, 2 threads), the default model's
compiled step graph with each order, both loaded in one process: one stream's decode step 119-149 ms
with x @ W^T against 57 ms, 32 streams 231-251 against 190-220 ms. The matmuls alone
(`python -m benchmarks.linear_layout`, one run) gain less and vary from run to run: 1 row 59 against
64 ms, 8 rows 129 against 100, 33 rows 190 against 178, 97 rows 381 against 336.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.mm(self.weight, rows.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
