"""The recipes: each job a function of a Config that composes the library.

One module per job: `generate`, `prepare` (validate and prepare a log), `train` (train, restore,
memory plan), `evaluate` (a ranking run against popularity), `export` (a run as a bundle) and
`retrieval` (full-catalog evaluation, two-stage recommendations, the item index); `runs` holds
what they share about a run directory, and `kinds` what differs between a ranking model and a
retrieval model. The CLI calls exactly one recipe per verb and the pipeline reuses them, so a
command and a pipeline step can never drift apart. The library never imports a recipe.
"""
