"""The scheduler's read side: functions that take a connection and plain parameters and return
plain data (rows, counts). The routes in ``services/scheduler/api.py`` and ``reports.py`` call
them; the statistics over their counts are in the pure ``domain/results.py``."""
