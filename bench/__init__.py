"""Benchmarks of keyrotation: KEK rotation, full re-encryption, memory, Airflow overhead, scaling.

Run ``python bench/run.py --size full`` (``make bench``) or ``--size tiny`` (the smoke test).
"""
