// llama.cpp as a reference for lmlab's tests: one GGUF model, a list of requests on stdin, JSON on stdout.
//
// Request: {"model": path, "threads": 1, "requests": [
//   {"mode": "tokenize", "texts": [str], "special": bool}            -> [[id]] (never adds BOS: llama.cpp's
//                                                                        common_tokenize(add_special=false))
//   (optional "context_size": default llama.cpp/node-llama-cpp's own, the model's training context if memory allows)
//   {"mode": "greedy", "prompts": [[id]], "n": int}                  -> [{tokens, margins}]: n new tokens, argmax
//                                                                        each step (margin: top-1 minus top-2 logit)
//   {"mode": "teacher", "sequences": [[id]]}                         -> [{tokens, margins}]: argmax after each
//                                                                        position
//   {"mode": "speed", "prompt": [id], "n": int, "repeats": int}    -> {prefill_s: [..], decode_s: [..]}: the prompt's
//                                                                        forward, then n - 1 greedy steps (one token
//                                                                        each, llama.cpp's own sampler), per repeat
//   {"mode": "chat_template", "conversations": [{"messages": [...], "add_generation_prompt": bool}]}
//                                                                     -> [str]: the file's template rendered by
//                                                                        llama.cpp's own Jinja engine
// ]}
// Output: {"info": {...}, "results": [...]} in request order. Token ids go in and out as given: nothing adds a BOS.
import {getLlama} from "node-llama-cpp";

const input = JSON.parse(await new Promise((resolve) => {
    let data = "";
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", (chunk) => data += chunk);
    process.stdin.on("end", () => resolve(data));
}));

const llama = await getLlama({gpu: false, build: "never", skipDownload: true, logLevel: "error"});
const model = await llama.loadModel({modelPath: input.model});
// default context and batch sizes; threads pinned so a shared CI machine is not oversubscribed (see __init__.py)
const context = await model.createContext({threads: input.threads ?? 1, ...(input.context_size ? {contextSize: input.context_size} : {})});

const sequence = context.getSequence();  // one sequence, emptied before each text
// argmax from the two largest raw logits: asking node-llama-cpp to sample a token (even at temperature 0)
// costs about a second per call on a small CPU, reading the top logits a few milliseconds
const top2 = {generateNext: {logits: {filter: {includeTop: 2}}}};

function best(output) {
    // [token, margin]: the argmax and how far ahead of the runner-up it is (small margins flip on rounding)
    const [[token, first], [, second]] = [...output.next.logits.entries()].sort((a, b) => b[1] - a[1]);
    return [token, first - second];
}

async function argmaxAfterEach(tokens) {
    await sequence.clearHistory();
    const out = await sequence.controlledEvaluate(tokens.map((t) => [t, top2]));
    const picks = out.map(best);
    return {tokens: picks.map((p) => p[0]), margins: picks.map((p) => p[1])};
}

async function generate(prompt, n) {
    await sequence.clearHistory();
    const tokens = [], margins = [];
    let input = prompt.map((t, i) => (i === prompt.length - 1 ? [t, top2] : t));
    for (let step = 0; step < n; step++) {
        const result = await sequence.controlledEvaluate(input);
        const [next, margin] = best(result[input.length - 1]);
        tokens.push(next);
        margins.push(margin);
        input = [[next, top2]];
    }
    return {tokens, margins};
}

function renderChat(template, conversation) {
    // llama.cpp's Jinja engine (the native one; node-llama-cpp would otherwise prefer a JS port)
    const renderer = new llama._bindings.AddonJinjaRenderer(template);
    const tok = (id) => (id == null ? "" : model.detokenize([id], true));
    return renderer.render({
        messages: conversation.messages,
        add_generation_prompt: conversation.add_generation_prompt ?? false,
        bos_token: tok(model.tokens.bos),
        eos_token: tok(model.tokens.eos),
    });
}

async function speed(prompt, n, repeats) {
    // decode speed as a user of llama.cpp sees it: its greedy sampler, one token per step, no logits read back
    const prefill = [], decode = [];
    for (let r = 0; r < repeats; r++) {
        await sequence.clearHistory();
        const t0 = performance.now();
        let t1 = 0, count = 0;
        for await (const token of sequence.evaluate(prompt, {temperature: 0})) {
            if (count === 0) t1 = performance.now();
            if (++count >= n) break;
        }
        const t2 = performance.now();
        prefill.push((t1 - t0) / 1000);
        decode.push((t2 - t1) / 1000);
    }
    return {prefill_s: prefill, decode_s: decode, tokens: n};
}

const results = [];
for (const r of input.requests) {
    if (r.mode === "tokenize")
        results.push(r.texts.map((t) => model.tokenize(t, r.special ?? false)));
    else if (r.mode === "greedy") {
        const rows = [];
        for (const p of r.prompts) rows.push(await generate(p, r.n));
        results.push(rows);
    } else if (r.mode === "teacher") {
        const rows = [];
        for (const s of r.sequences) rows.push(await argmaxAfterEach(s));
        results.push(rows);
    } else if (r.mode === "speed") {
        results.push(await speed(r.prompt, r.n, r.repeats ?? 3));
    } else if (r.mode === "chat_template") {
        const template = model.fileInfo.metadata?.tokenizer?.chat_template;
        if (template == null) throw new Error("the GGUF file has no tokenizer.chat_template");
        results.push(r.conversations.map((c) => renderChat(template, c)));
    } else throw new Error(`unknown mode ${r.mode}`);
}

const info = {
    bos: model.tokens.bos,
    eos: model.tokens.eos,
    add_bos: model.tokens.shouldPrependBosToken,
    n_vocab: model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length ?? null,
    context_size: context.contextSize,
    batch_size: context.batchSize,
    threads: context.currentThreads,
};
process.stdout.write(JSON.stringify({info, results}));
await context.dispose();
await model.dispose();
await llama.dispose();
