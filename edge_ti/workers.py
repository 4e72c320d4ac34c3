"""Where candidates are scored. A scorer holds what every evaluation needs (the model, the
tokenized prompts, the concept latents) and turns candidates + common random numbers into losses:

    scorer = InProcess(model, prompt_ids, latents, max_batch)
    losses = scorer.population_loss(candidates [P, n, D], triples)   # -> [P]

Each candidate's loss does not depend on which others share its batch (checked bitwise in the
tests), so a scorer may split a population any way it likes and the search stays the same.
"""
from . import objective


class InProcess:
    """Score in this process, the whole population batched (the default)."""

    def __init__(self, model, prompt_ids, latents, max_batch):
        self.model, self.prompt_ids, self.latents, self.max_batch = model, prompt_ids, latents, max_batch

    def population_loss(self, candidates, triples):
        return objective.population_loss(self.model, candidates, self.prompt_ids, self.latents, triples,
                                         self.max_batch)

    def close(self):
        pass
