"""Models of the MUSE family (`muse`, `sim_soft`, `sim_hard`, `din`) and `lemur`; `factory.make_model` picks one."""
