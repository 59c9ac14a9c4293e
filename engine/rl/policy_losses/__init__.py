"""Selectable policy losses (``--policy_loss_type``, ``registry``) and the aggregation they share
(``--loss_agg_mode``, ``aggregation``)."""
