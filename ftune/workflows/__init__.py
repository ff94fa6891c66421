"""The workflows, each a thin adapter over TRL: sft.py, dpo.py and grpo.py each hold one
`make_trainer(recipe, built, dataset, callbacks, eval_dataset=None)` that turns a recipe into its
TRL config and trainer; common.py holds what they share. The run around the trainer (output
folder, data, model, train, save) is ftune/runner.py's.
"""
