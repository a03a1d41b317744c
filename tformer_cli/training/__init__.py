"""Training: settings, optimizer and schedule, loss, resumable state, torch.distributed, the
loop shared by pretraining and fine-tuning, and the two recipes built on it.

    pretrain.py, finetune.py   the recipes: inputs checked, a LoopSpec built, the loop run
    context.py                 LoopSpec (what is trained), RunContext (where and how), open_run
    loop.py                    run_loop and train_step: lr, forward/backward, clip, step, ...
    trainable.py               the model, optimizer and precision a step works on
    budget.py                  --time: the loop's clock, when to stop, how many steps fit
    evaluation.py, metrics.py  validation loss and best/; metrics.jsonl
    checkpoint.py, state.py    saving as it trains and resuming bit for bit
    runcard.py                 the run card's data (commands/runcard.py shows it)
"""
