"""Several scorers voting: a pair is kept only when they agree (and, in pairing, when the margin passes).

Scores of different judges are not comparable (a PickScore logit, an aesthetic rating, a 0/1 verdict), so
an ensemble compares *ranks*: within the images of one prompt each member's scores become normalised ranks
in [0, 1] (worst 0, best 1, ties sharing the average rank). Two votes:

- ``mean-rank``: the combined score is the mean of the members' ranks; a is preferred to b only when every
  member scores a strictly higher (unanimity, as BalancedDPO's consensus labelling requires agreement).
- ``majority``: a is preferred to b when strictly more than half of the members score a strictly higher
  (a member that ties abstains but still counts in the total); the combined score is the share of the
  prompt's other images an image beats by majority (a Copeland score).

The pairing margin (`trainer.pairs.select_pairs`) is then in these combined units.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from PIL import Image

from .base import Judgement, Scorer, text_fingerprint

VOTES = ("mean-rank", "majority")


def normalised_ranks(scores: Sequence[float]) -> list[float]:
    """Rank of each score among `scores` scaled to [0, 1] (ties: average rank; a single image: 0.5)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 1:
        return [0.5]
    below = (s[None, :] < s[:, None]).sum(1)
    tied = (s[None, :] == s[:, None]).sum(1) - 1
    return ((below + 0.5 * tied) / (len(s) - 1)).tolist()


def prefers(vote: str, a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the members' scores `a` (of one image) beat `b` (of another) under `vote`."""
    wins = sum(x > y for x, y in zip(a, b))
    if vote == "mean-rank":
        return wins == len(a)
    if vote == "majority":
        return 2 * wins > len(a)
    raise ValueError(f"unknown vote {vote!r}; choose one of {', '.join(VOTES)}")


class Ensemble(Scorer):
    def __init__(self, members: Sequence[Scorer], vote: str = "mean-rank") -> None:
        if vote not in VOTES:
            raise ValueError(f"unknown vote {vote!r}; choose one of {', '.join(VOTES)}")
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two scorers")
        self.members, self.vote = list(members), vote
        self.name = f"ensemble[{vote}]({', '.join(m.name for m in self.members)})"
        self.fingerprint = text_fingerprint(vote, *(m.fingerprint for m in self.members))

    def identities(self) -> list[dict[str, str]]:
        return [{"name": self.name, "fingerprint": self.fingerprint}] + [i for m in self.members for i in m.identities()]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return self.judge(images, prompts).combined

    def judge(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Judgement:
        """Member scores for every image; ranks and votes are taken within each prompt's images."""
        columns = [m.score(images, prompts) for m in self.members]
        judgement = Judgement([0.0] * len(images), columns, [m.name for m in self.members], self.vote)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[prompt].append(i)
        for idx in groups.values():
            if self.vote == "mean-rank":
                ranks = np.mean([normalised_ranks([c[i] for i in idx]) for c in columns], axis=0)
            else:
                beaten = [sum(judgement.prefers(i, j) for j in idx if j != i) for i in idx]
                ranks = [b / max(1, len(idx) - 1) for b in beaten]
            for i, r in zip(idx, ranks):
                judgement.combined[i] = float(r)
        return judgement
