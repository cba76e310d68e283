"""vistune-dpo: preference optimisation (DPO, ORPO, SimPO, KTO) on stored preference data."""
