"""Continual retraining: `gramrec trainer` (worker), one job (job), its training data (snapshot), its settings.

The worker takes queued jobs while it holds the retrain lease; a job freezes a snapshot of the base data and the
logged interactions, warm-starts GRAM-1E from the active version, gates, exports, and activates the new version
through the serving side's activation (gramrec.service.activation).
"""
