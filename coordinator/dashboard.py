"""A one-page dashboard (no build step): federations, per-round metrics, accuracy plot."""

DASHBOARD_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>fedslim coordinator</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}input{width:22em}.fed{margin-bottom:2em}
</style></head><body>
<h1>fedslim coordinator</h1>
<p>Admin token: <input id="tok" type="password"> <button onclick="save()">Show</button> <span id="err"></span></p>
<div id="feds"></div>
<script>
const tok=document.getElementById('tok');tok.value=localStorage.getItem('fedslim-token')||'';
function save(){localStorage.setItem('fedslim-token',tok.value);load();}
async function get(p){const r=await fetch(p,{headers:{Authorization:'Bearer '+tok.value}});
 if(!r.ok) throw new Error(p+': '+r.status);return r.json();}
function chart(rows){const w=420,h=120;if(!rows.length)return '';
 const pts=rows.map((r,i)=>`${(i/(Math.max(rows.length-1,1)))*w},${h-r.accuracy*h}`).join(' ');
 return `<svg width="${w+10}" height="${h+10}" style="border:1px solid #ddd"><polyline fill="none" stroke="#1565c0" stroke-width="2" points="${pts}"/></svg>`;}
async function load(){
 const out=document.getElementById('feds');document.getElementById('err').textContent='';
 try{const feds=await get('/v1/federations');let html='';
  for(const f of feds){const rows=await get(`/v1/federations/${f.id}/rounds`);
   html+=`<div class="fed"><h2>${f.config.name} <small>(${f.id}, ${f.status}, round ${f.current_round}/${f.config.rounds}, strategy ${f.config.strategy.name})</small></h2>`+chart(rows)+
   '<table><tr><th>round</th><th>accuracy</th><th>loss</th><th>participants</th><th>KB up</th><th>KB down</th><th>MACs</th><th>s</th></tr>'+
   rows.map(r=>`<tr><td>${r.round}</td><td>${r.accuracy.toFixed(4)}</td><td>${r.loss.toFixed(3)}</td><td>${r.participants}</td><td>${(r.bytes_up/1024).toFixed(0)}</td><td>${(r.bytes_down/1024).toFixed(0)}</td><td>${(r.macs/1e6).toFixed(2)}M</td><td>${r.seconds.toFixed(1)}</td></tr>`).join('')+'</table></div>';}
  out.innerHTML=html||'<p>No federations yet.</p>';
 }catch(e){document.getElementById('err').textContent=e.message;}}
if(tok.value) load(); setInterval(()=>{if(tok.value) load();},5000);
</script></body></html>
"""
