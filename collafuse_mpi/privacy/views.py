"""What the attack suite works on: the cut images rank 0 recovered from the messages it really
received (the server's side), and which training images those messages came from (the
client's side, used only to score the attacks on the client's own rank)."""
from __future__ import annotations

import torch

from .. import schedule


class ViewLog:
    """Rank 0: per client, the x_k it recovers from each received training message, in order.
    Whole batches are kept while fewer than `limit` views are held, the same rule as SentLog."""

    def __init__(self, sched, limit: int):
        self.sched, self.limit = sched, limit
        self.views, self.steps, self.k = {}, {}, {}

    def add(self, client: int, step: int, x_t, t, k: int, eps_s) -> None:
        held = sum(len(v) for v in self.views.get(client, []))
        if held >= self.limit:
            return
        x_t, t, eps_s = x_t.cpu(), t.cpu(), eps_s.cpu()
        kk = torch.full_like(t, k)
        x_k = schedule.recover_cut(self.sched, x_t.double(), t, kk, eps_s.double())  # as the server can
        self.views.setdefault(client, []).append(x_k.float().cpu())
        self.steps.setdefault(client, []).append(torch.full((len(t),), step, dtype=torch.long))
        self.k[client] = k

    def of(self, client: int):
        """(views [n, C, H, W] float32, step of each view [n]) for one client."""
        return torch.cat(self.views[client]), torch.cat(self.steps[client])

    def clients(self) -> list[int]:
        return sorted(self.views)


class SentLog:
    """A client: which of its training images each kept message was built from."""

    def __init__(self, limit: int):
        self.limit, self.held, self.index = limit, 0, {}

    def add(self, step: int, index: torch.Tensor) -> None:
        if self.held >= self.limit:
            return
        self.index[step] = index.clone()
        self.held += len(index)

    def truth(self, steps: torch.Tensor) -> torch.Tensor:
        """Training-image index of every view, given the step of each view in the server's order."""
        out, seen = [], {}
        for s in steps.tolist():
            row = seen.get(s, 0)
            seen[s] = row + 1
            out.append(int(self.index[s][row]))
        return torch.tensor(out, dtype=torch.long)
