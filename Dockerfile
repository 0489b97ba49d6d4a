# The keyrotation image: Apache Airflow 3.3.2 with this project's DAGs, plugins and core library.
# Dependencies are installed at build time, pinned by constraints.txt (the full lock); never through
# _PIP_ADDITIONAL_REQUIREMENTS, which installs at every container start.
#   docker compose build        (or: docker build -t keyrotation-airflow:3.3.2 .)
# The Python 3.11 build of the official image: constraints.txt was locked on Python 3.11.
FROM apache/airflow:3.3.2-python3.11

USER airflow
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/keyrotation-build/
# The product's requirements only (development tools are in requirements-dev.txt); requirements.txt pins
# apache-airflow==3.3.2, the base image's version.
RUN pip install --no-cache-dir \
        -r /opt/airflow/keyrotation-build/requirements.txt \
        -c /opt/airflow/keyrotation-build/constraints.txt \
    && python -c "import airflow, celery, hvac, pyarrow; assert airflow.__version__ == '3.3.2', airflow.__version__"

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/
# Data (KEYROTATION_HOME) lives on a volume mounted here: created owned by airflow, so is the volume.
RUN mkdir -p /opt/airflow/var

# The core library and the plugins' package import as in development (Makefile's PYTHONPATH).
ENV PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins:/opt/airflow/dags \
    KEYROTATION_HOME=/opt/airflow/var \
    KEYROTATION_CONFIG_DIR=/opt/airflow/include/config/key_classes
