"""The Train tab in a real browser: the Advanced fold shows the job contract's defaults and Start works untouched."""

from __future__ import annotations

import pytest

from serve.job_spec import job_spec
from tests.conftest import wait_for
from tests.test_train_tab import train_app, upload_trainable  # noqa: F401 (train_app: the app fixture)

SHOWN = {"#train-epochs": "1", "#train-batch-size": "8", "#train-lr-multiplier": "1", "#train-max-steps": "0",
         "#train-seed": "42"}


@pytest.mark.browser
@pytest.mark.slow
def test_the_advanced_fields_show_the_contracts_defaults_and_start_works_untouched(train_app):  # noqa: F811
    page = train_app.open()
    upload_trainable(page)
    page.get_by_text("Advanced").click()
    for field, value in SHOWN.items():
        wait_for(page.locator(f"{field} input").is_visible, 10, what=f"{field} in the open fold")
        assert page.input_value(f"{field} input") == value, field
    assert page.get_by_text("Epochs (default 1)").is_visible()
    before = {job.id for job in train_app.runner.list()}
    page.click("#train-start")
    job = wait_for(lambda: next((j for j in train_app.runner.list() if j.id not in before), None), 30,
                   what="the job Start creates (not an error about a value of 0)")
    try:
        defaults = job_spec()
        assert (job.n_epochs, job.batch_size, job.learning_rate_multiplier, job.max_steps, job.seed) == (
            defaults.n_epochs, defaults.batch_size, defaults.learning_rate_multiplier, defaults.max_steps,
            defaults.seed)
    finally:
        train_app.runner.cancel(job.id)
