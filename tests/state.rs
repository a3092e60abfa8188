//! Per-sequence state export/import on the CPU backend (`Cache::export_sequence`,
//! `CpuBackend::{export,import}_sequence`): a sequence saved mid-decode, removed, and
//! restored into another slot (or another cache) continues bit for bit as if never
//! interrupted, and matches the reference; every bad buffer is refused with a named
//! reason and leaves the cache and pools as they were.

mod common;
use common::*;
use nsa::cache::PoolBytes;
use nsa::cpu::{CpuBackend, LayerIo, PhiWeights};
use nsa::reference::{prefill, RefInputs};
use nsa::{Cache, Config, Dtype, NsaError, Phi, Preset, StepSeq};

const LAYERS: usize = 2;

fn cfg(max_seqs: u32) -> Config {
    let mut c = Config::preset(Preset::Paper).with_shape(6, 2, 32, 16);
    c.dtype = Dtype::F32;
    c.num_layers = LAYERS as u32;
    c.sel_count = 4;
    c.window = 40;
    c.phi = Phi::Linear;
    c.phi_pe = true;
    c.max_seqs = max_seqs;
    c.max_step_seqs = max_seqs;
    c.max_seq_len = 400;
    c.max_step_tokens = 800;
    c.cpu_threads = 2;
    c.fit_pages();
    c
}

/// One logical sequence's inputs per layer, and each layer's phi weights.
struct Model {
    data: Vec<SeqData>,
    w: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Model {
    fn new(cfg: &Config, len: usize, rng: &mut Rng) -> Model {
        Model {
            data: (0..LAYERS).map(|_| SeqData::random::<f32>(cfg, len, rng)).collect(),
            w: (0..LAYERS).map(|_| random_weights(cfg, rng)).collect(),
        }
    }
}

/// Outputs `[len, HQ, DV]` and selections `[len, HKV, n]` per layer, filled as positions run.
struct Record {
    out: Vec<Vec<f32>>,
    sel: Vec<Vec<i32>>,
}

impl Record {
    fn new(cfg: &Config, len: usize) -> Record {
        let (hq, hkv, _, dv) = dims(cfg);
        Record {
            out: vec![vec![f32::NAN; len * hq * dv]; LAYERS],
            sel: vec![vec![i32::MIN; len * hkv * cfg.sel_count as usize]; LAYERS],
        }
    }
}

/// Appends positions `p0..p0+t` of `m` to slot `seq` (one step, every layer).
fn run(cache: &mut Cache, cpu: &mut CpuBackend, seq: u32, m: &Model, p0: usize, t: usize, rec: &mut Record) {
    let cfg = *cache.config();
    let (hq, hkv, dk, dv) = dims(&cfg);
    let n = cfg.sel_count as usize;
    assert_eq!(cache.len(seq).unwrap() as usize, p0);
    cache.plan_step(&[StepSeq { seq, tokens: t as u32 }]).unwrap();
    for (l, d) in m.data.iter().enumerate() {
        let rows = |x: &[f32], w: usize| x[p0 * w..(p0 + t) * w].to_vec();
        let mut out = vec![f32::NAN; t * hq * dv];
        let mut sel = vec![i32::MIN; t * hkv * n];
        let io = LayerIo {
            q: &rows(&d.q, hq * dk),
            k: &rows(&d.k, hkv * dk),
            v: &rows(&d.v, hkv * dv),
            gates: &rows(&d.gates, hq * 3),
            out: &mut out,
            selected: Some(&mut sel),
        };
        cpu.run_layer(cache, l as u32, io, PhiWeights { k: &m.w[l].0, v: &m.w[l].1 }).unwrap();
        rec.out[l][p0 * hq * dv..][..out.len()].copy_from_slice(&out);
        rec.sel[l][p0 * hkv * n..][..sel.len()].copy_from_slice(&sel);
    }
    cache.check_invariants().unwrap();
}

fn decode(cache: &mut Cache, cpu: &mut CpuBackend, seq: u32, m: &Model, from: usize, to: usize, rec: &mut Record) {
    for p in from..to {
        run(cache, cpu, seq, m, p, 1, rec);
    }
}

const PREFILL: usize = 150;
const SAVE_AT: usize = 171; // mid-page, mid compressed stride
const END: usize = 200;

#[test]
fn restored_sequence_continues_bit_for_bit_and_matches_the_reference() {
    let mut rng = Rng::new(41);
    let c = cfg(4);
    let m = Model::new(&c, END, &mut rng);
    let other = Model::new(&c, END, &mut rng);

    // A: never interrupted, alone in slot 0.
    let mut ea = Engine::new(&c);
    let mut cache_a = Cache::new(&c, ea.arena.bytes()).unwrap();
    let mut cpu_a = CpuBackend::new(&c, ea.pool.bytes()).unwrap();
    let mut rec_a = Record::new(&c, END);
    cache_a.add_sequence(0).unwrap();
    run(&mut cache_a, &mut cpu_a, 0, &m, 0, PREFILL, &mut rec_a);
    decode(&mut cache_a, &mut cpu_a, 0, &m, PREFILL, SAVE_AT, &mut rec_a);
    let mut state_a = vec![0u8; cache_a.sequence_state_bytes(0).unwrap()];
    assert_eq!(cpu_a.export_sequence(&cache_a, 0, &mut state_a).unwrap(), state_a.len());
    decode(&mut cache_a, &mut cpu_a, 0, &m, SAVE_AT, END, &mut rec_a);

    // B: the same sequence among others, with a fork sharing its pages; saved at SAVE_AT,
    // removed, its pages reused by another sequence, restored into slot 3.
    let mut eb = Engine::new(&c);
    let mut cache = Cache::new(&c, eb.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, eb.pool.bytes()).unwrap();
    let mut rec = Record::new(&c, END);
    let mut rec_other = Record::new(&c, END);
    cache.add_sequence(1).unwrap();
    run(&mut cache, &mut cpu, 1, &other, 0, 70, &mut rec_other);
    cache.add_sequence(0).unwrap();
    run(&mut cache, &mut cpu, 0, &m, 0, PREFILL, &mut rec);
    cache.fork(0, 2).unwrap(); // slot 0's next appends copy the shared partial pages
    decode(&mut cache, &mut cpu, 0, &m, PREFILL, SAVE_AT, &mut rec);
    let mut state = vec![0xA5u8; cache.sequence_state_bytes(0).unwrap()];
    assert_eq!(cpu.export_sequence(&cache, 0, &mut state).unwrap(), state.len());
    // Page ids and rows past the end are not in the format: both runs export the same bytes.
    assert!(state == state_a, "the same sequence state exported from two caches differs");
    cache.remove(0).unwrap();
    // Slot 1 grows into the pages slot 0 freed, overwriting their rows.
    run(&mut cache, &mut cpu, 1, &other, 70, 130, &mut rec_other);
    assert_eq!(cache.sequences().collect::<Vec<_>>(), vec![1, 2]);
    cpu.import_sequence(&mut cache, 3, &state).unwrap();
    cache.check_invariants().unwrap();
    assert_eq!(cache.sequences().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(cache.len(3).unwrap() as usize, SAVE_AT);
    decode(&mut cache, &mut cpu, 3, &m, SAVE_AT, END, &mut rec);

    // C: restored into a fresh cache of another capacity (more slots), into slot 4.
    let c5 = cfg(5);
    let mut ec = Engine::new(&c5);
    let mut cache_c = Cache::new(&c5, ec.arena.bytes()).unwrap();
    let mut cpu_c = CpuBackend::new(&c5, ec.pool.bytes()).unwrap();
    let mut rec_c = Record::new(&c, END);
    cpu_c.import_sequence(&mut cache_c, 4, &state).unwrap();
    decode(&mut cache_c, &mut cpu_c, 4, &m, SAVE_AT, END, &mut rec_c);

    let (hq, hkv, _, dv) = dims(&c);
    let n = c.sel_count as usize;
    for l in 0..LAYERS {
        assert!(rec.out[l].iter().all(|x| x.is_finite()), "layer {l}: unwritten outputs");
        assert_eq!(rec.out[l], rec_a.out[l], "layer {l}: restored run differs from the uninterrupted one");
        assert_eq!(rec.sel[l], rec_a.sel[l], "layer {l}: selections differ");
        let tail = SAVE_AT * hq * dv..;
        assert_eq!(rec_c.out[l][tail.clone()], rec_a.out[l][tail], "layer {l}: restored into another cache differs");
        assert_eq!(rec_c.sel[l][SAVE_AT * hkv * n..], rec_a.sel[l][SAVE_AT * hkv * n..]);
        // The reference, given the engine's selections (near ties may pick other blocks).
        let d = &m.data[l];
        let inp = RefInputs { cfg: &c, q: &d.q, k: &d.k, v: &d.v, gates: &d.gates, phi_k: &m.w[l].0, phi_v: &m.w[l].1, selection: Some(&rec.sel[l]) };
        let err = max_rel_err(&rec.out[l], &prefill(&inp).out);
        assert!(err < 1e-5, "layer {l}: error vs reference {err:e}");
    }
    // The fork (slot 2) still holds its own prefix: export it and compare with A's prefix.
    let mut s2 = vec![0u8; cache.sequence_state_bytes(2).unwrap()];
    cpu.export_sequence(&cache, 2, &mut s2).unwrap();
    cache_a.truncate(0, PREFILL as u32).unwrap();
    let mut a_prefix = vec![0u8; s2.len()];
    cpu_a.export_sequence(&cache_a, 0, &mut a_prefix).unwrap();
    assert!(s2 == a_prefix, "the fork's state differs from the prefix it shares");
}

/// Pools that fail the `fail_at`-th write (a device copy error, say).
struct FailingPools {
    writes: usize,
    fail_at: usize,
}

impl PoolBytes for FailingPools {
    fn read(&self, _off: usize, dst: &mut [u8]) -> nsa::Result<()> {
        dst.fill(7);
        Ok(())
    }
    fn write(&mut self, _off: usize, _src: &[u8]) -> nsa::Result<()> {
        self.writes += 1;
        if self.writes == self.fail_at {
            return Err(NsaError::Cuda("test: copy failed".into()));
        }
        Ok(())
    }
}

fn arg_msg(e: NsaError) -> String {
    match &e {
        NsaError::InvalidArgument { arg, .. } => assert_eq!(*arg, "state", "{e}"),
        other => panic!("expected InvalidArgument(state), got {other:?}"),
    }
    e.to_string()
}

#[test]
fn bad_buffers_are_refused_and_change_nothing() {
    let mut rng = Rng::new(42);
    let c = cfg(3);
    let m = Model::new(&c, 120, &mut rng);
    let mut e = Engine::new(&c);
    let mut cache = Cache::new(&c, e.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, e.pool.bytes()).unwrap();
    let mut rec = Record::new(&c, 120);
    cache.add_sequence(0).unwrap();
    run(&mut cache, &mut cpu, 0, &m, 0, 100, &mut rec);
    let need = cache.sequence_state_bytes(0).unwrap();
    let mut good = vec![0u8; need];
    // Too small an output buffer: refused, nothing written.
    let mut small = vec![9u8; need - 1];
    assert!(matches!(cpu.export_sequence(&cache, 0, &mut small), Err(NsaError::BufferTooSmall { need: n, .. }) if n == need));
    assert!(small.iter().all(|&b| b == 9));
    assert!(matches!(cpu.export_sequence(&cache, 1, &mut good), Err(NsaError::UnknownSequence { seq: 1 })));
    cpu.export_sequence(&cache, 0, &mut good).unwrap();

    let before = cache.state_bytes().to_vec();
    let unchanged = |cache: &Cache, what: &str| {
        assert!(cache.state_bytes() == before.as_slice(), "{what}: the cache changed");
        cache.check_invariants().unwrap();
    };
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "header"),
        ("truncated header", good[..100].to_vec(), "header"),
        ("truncated payload", good[..need - 1].to_vec(), "truncated"),
        ("wrong magic", patched(0, b"NOTSTATE"), "magic"),
        ("future version", patched(8, &2u32.to_le_bytes()), "version 2"),
        ("header size", patched(12, &64u32.to_le_bytes()), "header bytes 64"),
        ("head_dim_qk", patched(16 + 4 * 2, &64u32.to_le_bytes()), "head_dim_qk"),
        ("dtype", patched(16 + 4 * 4, &2u32.to_le_bytes()), "dtype"),
        ("num_layers", patched(16 + 4 * 17, &1u32.to_le_bytes()), "num_layers"),
        ("length past max_seq_len", patched(88, &1000u32.to_le_bytes()), "max_seq_len"),
        ("ncmp", patched(92, &1u32.to_le_bytes()), "ncmp"),
        ("length vs payload", patched(88, &[129u32.to_le_bytes(), 7u32.to_le_bytes()].concat()), "payload"),
        ("reserved", patched(120, &[1]), "reserved"),
    ];
    for (what, buf, want) in cases {
        let msg = arg_msg(cpu.import_sequence(&mut cache, 1, &buf).expect_err(what));
        assert!(msg.contains(want), "{what}: {msg}");
        unchanged(&cache, what);
    }
    // A state of another config: refused, naming the field and both values.
    let mut other_cfg = cfg(3);
    other_cfg.window = 48;
    let mut eo = Engine::new(&other_cfg);
    let mut cache_o = Cache::new(&other_cfg, eo.arena.bytes()).unwrap();
    let mut cpu_o = CpuBackend::new(&other_cfg, eo.pool.bytes()).unwrap();
    let msg = arg_msg(cpu_o.import_sequence(&mut cache_o, 0, &good).unwrap_err());
    assert!(msg.contains("window = 40") && msg.contains("48"), "{msg}");
    // Into a live slot, out of range, into a cache made with another config.
    assert!(matches!(cpu.import_sequence(&mut cache, 0, &good), Err(NsaError::SequenceExists { seq: 0 })));
    assert!(cpu.import_sequence(&mut cache, 3, &good).unwrap_err().to_string().contains("seq = 3"));
    assert!(cpu_o.import_sequence(&mut cache, 1, &good).unwrap_err().to_string().contains("different config"));
    unchanged(&cache, "slot checks");
    // A failing pool write, at the first and at a later page: no page taken, no slot live.
    for fail_at in [1, 3] {
        let mut pools = FailingPools { writes: 0, fail_at };
        assert!(matches!(cache.import_sequence(1, &mut pools, &good), Err(NsaError::Cuda(_))));
        unchanged(&cache, "failing write");
    }
    // Out of pages: a cache whose pools hold one sequence, already full.
    let mut tight = cfg(2);
    tight.num_pages = 2;
    tight.num_cmp_pages = 1;
    let mut et = Engine::new(&tight);
    let mut cache_t = Cache::new(&tight, et.arena.bytes()).unwrap();
    let mut cpu_t = CpuBackend::new(&tight, et.pool.bytes()).unwrap();
    cache_t.add_sequence(0).unwrap();
    run(&mut cache_t, &mut cpu_t, 0, &m, 0, 65, &mut Record::new(&tight, 120));
    let snap = cache_t.state_bytes().to_vec();
    assert!(matches!(cpu_t.import_sequence(&mut cache_t, 1, &good), Err(NsaError::OutOfPages { .. })));
    assert!(cache_t.state_bytes() == snap.as_slice());
    // And the good buffer still imports.
    cpu.import_sequence(&mut cache, 2, &good).unwrap();
    assert_eq!(cache.len(2).unwrap(), 100);
}

#[test]
fn an_empty_sequence_round_trips() {
    let c = cfg(2);
    let mut e = Engine::new(&c);
    let mut cache = Cache::new(&c, e.arena.bytes()).unwrap();
    let mut cpu = CpuBackend::new(&c, e.pool.bytes()).unwrap();
    cache.add_sequence(1).unwrap();
    let mut buf = vec![0u8; cache.sequence_state_bytes(1).unwrap()];
    assert_eq!(buf.len(), nsa::cache::STATE_HEADER_BYTES);
    cpu.export_sequence(&cache, 1, &mut buf).unwrap();
    cpu.import_sequence(&mut cache, 0, &buf).unwrap();
    assert_eq!(cache.len(0).unwrap(), 0);
    assert_eq!(cache.stats().raw_free, c.num_pages);
}
