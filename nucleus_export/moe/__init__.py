"""The MoE custom ops in every form: expert-choice routing (expert_choice) and the combine (combine)."""
