"""Training drivers, one per algorithm family: data -> jitted step -> metrics -> eval -> checkpoints.

`sft.train(SFTConfig)`, `reward_model.train(RewardModelConfig)` and `dpo.train(DPOConfig)` each
resume from their run directory's latest checkpoint; `loop.fit` is the loop they share.
"""
