"""Ray- and MLflow-facing building blocks: teacher service, stage runner, scheduler, tracking."""
