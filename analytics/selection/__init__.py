"""The selection experiment's analyses beyond the arms: the planted positive control's recovery metrics."""
