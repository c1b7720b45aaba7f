"""Any trainer in place of `megaflow train`: a bare PyTorch loop, a plain consumer of
``client.batches`` and ``client.publish_policy`` (the README's "twenty lines").

Token-level clipped ratio (GRPO) on the recorded ids against the recorded behaviour
logprobs; only model tokens (``loss_mask``) count. `megaflow.rl.trainer` is the same
loop with GSPO, LoRA, micro-batches and logging.
"""

import torch


def train(client, run_id, model, optimizer, out_dir, groups=1, eps=0.2):
    with client.batches(run_id, groups_per_batch=groups) as stream:
        for step, batch in enumerate(stream, 1):
            optimizer.zero_grad()
            for ep in batch.episodes:
                ids = torch.tensor([ep.input_ids])
                mask = torch.tensor(ep.loss_mask[1:], dtype=torch.float32)  # token t is predicted at t-1
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                ratio = torch.exp((logp - torch.tensor(ep.behaviour_logprobs[1:])) * mask)
                adv = ep.advantage
                gain = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
                loss = -(gain * mask).sum() / mask.sum().clamp(min=1) / len(batch.episodes)
                loss.backward()
            optimizer.step()
            path = f"{out_dir}/step-{step}.pt"
            torch.save(model.state_dict(), path)
            client.publish_policy(path, kind="full", run_id=run_id)  # model workers switch to it
            batch.ack()  # never handed out again
